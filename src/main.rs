//! `pipeline`: parse arguments, call the engine, format for humans or `--json`.

mod compare;
mod found;
mod output;
mod progress;
mod report;
mod review;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand, ValueEnum};
use artifacts::Artifact;
use engine::{Diagnostic, Registry, Store};

/// Exit codes (also in README.md).
mod exit {
    pub const OK: u8 = 0;
    /// A stage failed; the others finished and were kept.
    pub const STAGE_FAILED: u8 = 1;
    /// The pipeline file (or the command line) is invalid; nothing ran.
    pub const INVALID: u8 = 2;
    /// The store is in use by another run, or could not be read or written.
    pub const STORE: u8 = 3;
    /// `--locked` and the run would not match the lockfile.
    pub const LOCKED: u8 = 4;
    /// `run --gate`: the run finished, and the pipeline's `[targets]` were not met.
    pub const TARGETS_MISSED: u8 = 5;
    /// `check`: a candidate's held-out quality dropped significantly against the baseline.
    pub const REGRESSED: u8 = 6;
    /// Interrupted (Ctrl-C); finished work was kept.
    pub const INTERRUPTED: u8 = 130;
}

/// Why a command stopped short. Each case has its exit code here and nowhere else, and is
/// reported once, by [`Failure::report`] (nextest's `ExpectedError` is the model). A run that
/// finished with a failed stage or was interrupted is an outcome, not a failure: its code comes
/// with its report.
enum Failure {
    /// The pipeline file or the arguments are invalid (located diagnostics); nothing ran.
    Invalid(Vec<Diagnostic>),
    /// A command asked for something the pipeline does not have (a stage, a revised prompt), or
    /// a server could not start.
    Usage(String),
    /// The store is busy, unreadable or unwritable, or holds no run to read.
    Store(String),
    /// `--locked`, and the run does not match the lockfile, or there is none.
    Locked(String),
    /// `--locked`, and the lockfile cannot be read.
    LockfileInvalid(Diagnostic),
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Failure::Invalid(_) | Failure::Usage(_) => exit::INVALID,
            Failure::Store(_) => exit::STORE,
            Failure::Locked(_) | Failure::LockfileInvalid(_) => exit::LOCKED,
        }
    }

    /// Say it (as JSON with `--json`); the exit code.
    fn report(self, json: bool) -> u8 {
        let code = self.exit_code();
        match self {
            Failure::Invalid(diags) => output::diagnostics(&diags, json),
            Failure::LockfileInvalid(d) => output::diagnostics(&[d], json),
            Failure::Usage(message) | Failure::Store(message) | Failure::Locked(message) => {
                if json {
                    println!("{}", serde_json::json!({"ok": false, "error": message, "exit_code": code}));
                } else {
                    eprintln!("{}", Diagnostic::error(message).render(output::color()));
                }
            }
        }
        code
    }
}

/// What a command ends with: its exit code, or why it stopped short.
type Outcome = Result<u8, Failure>;

/// The one async runtime a command runs on.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime")
}

#[derive(Parser)]
#[command(
    name = "pipeline",
    version,
    about = "Find the smallest open model and prompt that is good enough for your task",
    long_about = "Pipelines are TOML files describing a DAG of stages. `pipeline` validates them like a \
compiler, plans and runs them incrementally (only what changed executes), and pins every input in a \
lockfile beside the pipeline.\n\nLogs: set RUST_LOG (e.g. RUST_LOG=engine=debug).",
    after_help = "Exit codes: 0 ok · 1 a stage failed · 2 invalid pipeline or arguments · 3 store busy or unwritable · 4 --locked mismatch · 5 targets missed (run --gate) · 6 quality regressed (check) · 130 interrupted"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a pipeline file and report every problem at once.
    Validate(Common),
    /// Dry run: say which stages are fresh or dirty, and why. Writes nothing.
    Plan(WithStore),
    /// Run what is stale; a rerun with nothing changed executes nothing.
    Run(RunArgs),
    /// Print the stage graph as Mermaid or DOT.
    Graph(GraphArgs),
    /// Print a stage's output artifact from the last run.
    Show(ShowArgs),
    /// Write a `training_data` stage's set as JSONL, in the shapes hosted fine-tuning APIs take:
    /// `sft` lines are `{"messages": [...]}`; `dpo` lines `{"input": {"messages": [...]},
    /// "preferred_output": [...], "non_preferred_output": [...]}`.
    Export(ExportArgs),
    /// What moved between two runs (pipeline files, or `FILE@N` for iteration N of one): per
    /// candidate, held-out quality and its paired change with a 95% CI; per failure mode, its size.
    Compare(CompareArgs),
    /// The CI gate: fail (exit 6) when a candidate's held-out quality dropped significantly
    /// against a baseline — a paired McNemar test over the samples both runs judged, not a raw
    /// threshold.
    Check(CheckArgs),
    /// Print the JSON Schema of pipeline files (for the registered stage kinds) or of catalogs.
    Schema {
        #[arg(value_enum, default_value_t = SchemaOf::Pipeline)]
        of: SchemaOf,
    },
    /// List the stage kinds this binary knows.
    Kinds(JsonFlag),
    /// Read a run's traces on a local page and label them pass or fail (labels go to a JSONL file
    /// beside the pipeline, which `llm_judge` measures its judge against).
    Review(ReviewArgs),
    /// Serve a catalog model, embedded, behind an OpenAI-compatible API (`/v1/chat/completions`).
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ReviewArgs {
    #[command(flatten)]
    inner: WithStore,
    /// Iteration (1-based) of the last run [default: the last].
    #[arg(long)]
    iteration: Option<u32>,
    /// Labels file [default: the `labels` of the pipeline's `llm_judge` stage, else
    /// labels/<pipeline>.jsonl beside the pipeline file].
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Port on 127.0.0.1 (the page is served on loopback only); 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    port: u16,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Catalog file, e.g. catalogs/open-models.toml.
    #[arg(long)]
    catalog: PathBuf,
    /// Catalog id of the model to serve.
    #[arg(long)]
    model: String,
    /// Convert GGUF weights before serving (as an `infer` stage's `prepare`).
    #[arg(long, value_enum)]
    prepare: Option<PrepareArg>,
    /// Address to listen on; loopback unless you say otherwise. Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: std::net::SocketAddr,
}

#[derive(Clone, Copy, ValueEnum)]
enum PrepareArg {
    #[value(name = "q8_0")]
    Q8_0,
}

#[derive(clap::Args)]
struct JsonFlag {
    /// Machine-readable output on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct Common {
    /// Pipeline file, e.g. pipelines/select.toml.
    file: PathBuf,
    #[command(flatten)]
    json: JsonFlag,
}

#[derive(clap::Args)]
struct WithStore {
    #[command(flatten)]
    common: Common,
    /// Store directory [default: .pipeline/ beside the pipeline file].
    #[arg(long, env = "PIPELINE_STORE")]
    store: Option<PathBuf>,
}

#[derive(clap::Args)]
struct CompareArgs {
    /// The run before: a pipeline file, or `FILE@N` for its iteration N.
    a: String,
    /// The run after.
    b: String,
    /// Store directory [default: .pipeline/ beside each pipeline file].
    #[arg(long, env = "PIPELINE_STORE")]
    store: Option<PathBuf>,
    #[command(flatten)]
    json: JsonFlag,
}

#[derive(clap::Args)]
struct CheckArgs {
    #[command(flatten)]
    inner: WithStore,
    /// The run to check against: a lockfile (its judgement read from the store by digest: the
    /// base branch's `select.lock`, say), a pipeline file's last run, or `FILE@N`.
    #[arg(long)]
    baseline: String,
    /// A drop is a regression when the McNemar test's p-value is below this.
    #[arg(long, default_value_t = 0.05)]
    alpha: f64,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    inner: WithStore,
    /// Refuse to run if anything differs from the lockfile (and never write it).
    #[arg(long)]
    locked: bool,
    /// Stages running at once.
    #[arg(long, short, default_value_t = default_jobs())]
    jobs: usize,
    /// Append every engine event as a JSON line to this file.
    #[arg(long)]
    events: Option<PathBuf>,
    /// Exit 5 when the run finished but the pipeline's `[targets]` were not met (for CI).
    #[arg(long)]
    gate: bool,
}

#[derive(clap::Args)]
struct GraphArgs {
    file: PathBuf,
    #[arg(long, value_enum, default_value_t = GraphFormat::Mermaid)]
    format: GraphFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum SchemaOf {
    Pipeline,
    Catalog,
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    Mermaid,
    Dot,
    Json,
}

#[derive(clap::Args)]
struct ShowArgs {
    #[command(flatten)]
    inner: WithStore,
    /// Stage id.
    stage: String,
    /// Iteration (1-based) [default: the last].
    #[arg(long)]
    iteration: Option<u32>,
    /// For a revised prompt: a unified diff against the version it was revised from.
    #[arg(long)]
    diff: bool,
}

#[derive(clap::Args)]
struct ExportArgs {
    #[command(flatten)]
    inner: WithStore,
    /// The `training_data` stage's id.
    stage: String,
    #[arg(long, value_enum)]
    format: ExportFormat,
    /// Write here (whole or not at all) instead of to standard output.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Iteration (1-based) [default: the last].
    #[arg(long)]
    iteration: Option<u32>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportFormat {
    /// Supervised examples.
    Sft,
    /// Preference pairs.
    Dpo,
}

fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).min(8)
}

pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register::<capacity::CapacityPlugin>()
        .register::<cluster::Cluster>()
        .register::<command::Command>()
        .register::<dataset::Dataset>()
        .register::<finetune::Finetune>()
        .register::<infer::Infer>()
        .register::<judge::Judge>()
        .register::<llm_judge::LlmJudge>()
        .register::<license_filter::LicenseFilter>()
        .register::<prompt::Prompt>()
        .register::<prompt::Render>()
        .register::<revise::Revise>()
        .register::<select::Select>()
        .register::<finetune::TrainingData>();
    r
}

impl Command {
    /// Whether the command reports as JSON.
    fn json(&self) -> bool {
        match self {
            Command::Validate(a) => a.json.json,
            Command::Plan(a) | Command::Review(ReviewArgs { inner: a, .. }) => a.common.json.json,
            Command::Run(a) => a.inner.common.json.json,
            Command::Show(a) => a.inner.common.json.json,
            Command::Export(a) => a.inner.common.json.json,
            Command::Graph(a) => matches!(a.format, GraphFormat::Json),
            Command::Compare(a) => a.json.json,
            Command::Check(a) => a.inner.common.json.json,
            Command::Kinds(a) => a.json,
            Command::Schema { .. } | Command::Serve(_) => false,
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        // mistral.rs warns about its own device and cache choices; only its errors concern users.
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,mistralrs=error,mistralrs_core=error,mistralrs_quant=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let json = cli.command.json();
    let outcome = match cli.command {
        Command::Validate(args) => validate(&args),
        Command::Plan(args) => plan(&args),
        Command::Run(args) => run(args),
        Command::Graph(args) => graph(&args),
        Command::Show(args) => show(&args),
        Command::Export(args) => export(&args),
        Command::Compare(args) => compare_runs(&args),
        Command::Check(args) => check(&args),
        Command::Schema { of } => {
            let schema = match of {
                SchemaOf::Pipeline => engine::schema::pipeline_schema(&registry()),
                SchemaOf::Catalog => catalog::schema(),
            };
            output::stdout(&engine::schema::render(&schema));
            Ok(exit::OK)
        }
        Command::Kinds(args) => {
            output::kinds(&registry(), args.json);
            Ok(exit::OK)
        }
        Command::Review(args) => review(args),
        Command::Serve(args) => serve(&args),
    };
    ExitCode::from(outcome.unwrap_or_else(|failure| failure.report(json)))
}

fn serve(args: &ServeArgs) -> Outcome {
    let runtime = runtime();
    let config = infer::serve::ServeConfig {
        catalog: &args.catalog,
        model: &args.model,
        prepare: args.prepare.map(|PrepareArg::Q8_0| infer::Prepare::Q8_0),
        device: infer::DeviceSpec::Cpu,
        listen: args.listen,
    };
    let ready = |addr: std::net::SocketAddr, fingerprint: &str| {
        eprintln!("serving `{}` ({fingerprint}) at http://{addr}/v1 — Ctrl-C to stop", args.model);
    };
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    runtime.block_on(infer::serve::serve(config, ready, shutdown)).map_err(Failure::Usage)?;
    Ok(exit::OK)
}

fn load(file: &Path) -> Result<engine::Pipeline, Failure> {
    engine::load(file, &registry()).map_err(Failure::Invalid)
}

fn store_for(pipeline: &engine::Pipeline, store: &Option<PathBuf>) -> Store {
    Store::new(store.clone().unwrap_or_else(|| pipeline.base_dir.join(".pipeline")))
}

fn validate(args: &Common) -> Outcome {
    output::valid(&load(&args.file)?, args.json.json);
    Ok(exit::OK)
}

fn plan(args: &WithStore) -> Outcome {
    let pipeline = load(&args.common.file)?;
    let plan = engine::plan(&pipeline, &store_for(&pipeline, &args.store)).map_err(|e| Failure::Store(e.to_string()))?;
    output::plan(&plan, args.common.json.json);
    Ok(exit::OK)
}

fn run(args: RunArgs) -> Outcome {
    let json = args.inner.common.json.json;
    let pipeline = Arc::new(load(&args.inner.common.file)?);
    let lock_path = engine::lockfile::path_for(&pipeline);
    let locked = if args.locked {
        match engine::lockfile::Lockfile::read(&lock_path) {
            Ok(Some(lock)) => Some(lock),
            Ok(None) => return Err(Failure::Locked(format!("--locked: there is no lockfile at {}; run without --locked first", lock_path.display()))),
            Err(d) => return Err(Failure::LockfileInvalid(d)),
        }
    } else {
        None
    };
    let store = store_for(&pipeline, &args.inner.store);
    let cancel = Arc::new(AtomicBool::new(false));
    let mut observers: Vec<Arc<dyn engine::Observer>> = vec![Arc::new(progress::Progress::new(!json))];
    if let Some(path) = &args.events {
        let log = progress::EventLog::create(path).map_err(|e| Failure::Store(format!("cannot open event log {}: {e}", path.display())))?;
        observers.push(Arc::new(log));
    }
    let opts = engine::RunOptions { jobs: args.jobs, locked, observer: Arc::new(engine::events::Tee(observers)), cancel: cancel.clone() };
    let result = runtime().block_on(async {
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: letting running items finish and keeping finished work (Ctrl-C again to quit now)");
                cancel.store(true, Ordering::SeqCst);
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(exit::INTERRUPTED.into());
                }
            }
        });
        engine::run(pipeline.clone(), store, opts).await
    });
    match result {
        Ok(report) => {
            // A stage may sum itself up in a top-level `summary` (e.g. `select`'s decision).
            let store = store_for(&pipeline, &args.inner.store);
            // Read for its summary alone: a 10,000-item artifact is not built as a `Value` for it.
            #[derive(serde::Deserialize)]
            struct Summary {
                summary: Option<String>,
            }
            let registry = registry();
            let summaries: Vec<(String, String)> = report
                .iterations
                .last()
                .map(|it| {
                    it.stages
                        .iter()
                        // A fed stage's output is another stage's, summary included.
                        .filter(|s| s.status != engine::exec::Status::Fed)
                        .filter(|s| registry.get(&s.kind).is_some_and(|k| artifacts::SUMMARIZED.contains(&k.output())))
                        .filter_map(|s| Some((s.id.clone(), store.get_object_as::<Summary>(&s.output?)?.summary?)))
                        .collect()
                })
                .unwrap_or_default();
            // The report is for people: a run that cannot write it still succeeded.
            let html = match report::write(&pipeline, &report, &store, &output::stop_text(&report)) {
                Ok(path) => Some(path),
                Err(e) => {
                    tracing::warn!(error = %e, "could not write the run report");
                    None
                }
            };
            output::run(&pipeline, &report, &summaries, &lock_path, html.as_deref(), json);
            let missed = report.iterations.last().and_then(|it| it.targets_met) == Some(false);
            Ok(match report.stop {
                engine::exec::StopReason::Failed => exit::STAGE_FAILED,
                engine::exec::StopReason::Interrupted => exit::INTERRUPTED,
                _ if args.gate && missed => {
                    if !json {
                        eprintln!("--gate: the targets were not met (exit {})", exit::TARGETS_MISSED);
                    }
                    exit::TARGETS_MISSED
                }
                _ => exit::OK,
            })
        }
        Err(e @ engine::RunError::LockMismatch(_)) => Err(Failure::Locked(format!("--locked: {e}\n  the lockfile {} was left as it is", lock_path.display()))),
        // A full disk, a read-only or vanished store: say what survives and how to go on.
        Err(e @ engine::RunError::Store(engine::store::StoreError::Io { .. })) => Err(Failure::Store(format!(
            "{e}\n  work that finished before this was kept, and the lockfile {} was left as it is; once the store can be written (free space, or `--store DIR`), the next run continues from there",
            lock_path.display()
        ))),
        Err(e) => Err(Failure::Store(e.to_string())),
    }
}

fn graph(args: &GraphArgs) -> Outcome {
    output::stdout(&output::graph(&load(&args.file)?, args.format));
    Ok(exit::OK)
}

/// A stage's output in the last run's iteration `iteration` (1-based; default the last).
fn stage_output(pipeline: &engine::Pipeline, store: &engine::Store, stage: &str, iteration: Option<u32>) -> Result<serde_json::Value, Failure> {
    let Some(report) = store.get_run::<engine::RunReport>(&pipeline.name) else {
        return Err(Failure::Store(format!("`{}` has not been run yet (no run record in {})", pipeline.name, store.root().display())));
    };
    if !pipeline.stages.iter().any(|s| s.id == stage) {
        let ids: Vec<&str> = pipeline.stages.iter().map(|s| s.id.as_str()).collect();
        return Err(Failure::Usage(format!("no stage `{stage}`; stages are: {}", engine::diag::one_of(&ids))));
    }
    report.output(stage, iteration.map(|k| k.saturating_sub(1))).and_then(|d| store.get_object(&d)).ok_or_else(|| {
        Failure::Store(format!(
            "stage `{stage}` has no output in {} of the last run ({} iteration(s))",
            iteration.map_or("the last iteration".to_string(), |k| format!("iteration {k}")),
            report.iterations.len()
        ))
    })
}

fn show(args: &ShowArgs) -> Outcome {
    let pipeline = load(&args.inner.common.file)?;
    let store = store_for(&pipeline, &args.inner.store);
    let value = stage_output(&pipeline, &store, &args.stage, args.iteration)?;
    if !args.diff {
        output::stdout(&(serde_json::to_string_pretty(&value).expect("JSON") + "\n"));
        return Ok(exit::OK);
    }
    let diff = artifacts::Prompt::read(&value).ok().as_ref().and_then(output::prompt_diff).ok_or_else(|| {
        Failure::Usage(format!("stage `{}` has no revised prompt here: `--diff` needs a prompt a `revise` stage wrote", args.stage))
    })?;
    output::stdout(&diff);
    Ok(exit::OK)
}

fn export(args: &ExportArgs) -> Outcome {
    let pipeline = load(&args.inner.common.file)?;
    let store = store_for(&pipeline, &args.inner.store);
    let value = stage_output(&pipeline, &store, &args.stage, args.iteration)?;
    let set = artifacts::TrainingSet::read(&value)
        .map_err(|_| Failure::Usage(format!("stage `{}` is not a `training_data` stage: `export` writes training sets", args.stage)))?;
    let lines: Vec<serde_json::Value> = match args.format {
        ExportFormat::Sft => set.sft.iter().map(finetune::data::sft_line).collect(),
        ExportFormat::Dpo => set.dpo.iter().map(finetune::data::dpo_line).collect(),
    };
    let text: String = lines.iter().map(|l| serde_json::to_string(l).expect("JSON") + "\n").collect();
    match &args.output {
        None => output::stdout(&text),
        Some(path) => {
            // Beside the target, then renamed over it: a reader never sees half a file.
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let tmp = dir.join(format!(".{}.tmp-{}", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(), std::process::id()));
            std::fs::write(&tmp, &text)
                .and_then(|()| std::fs::rename(&tmp, path))
                .map_err(|e| {
                    let _ = std::fs::remove_file(&tmp);
                    Failure::Usage(format!("cannot write {}: {e}", path.display()))
                })?;
            eprintln!("wrote {} {} lines to {}", lines.len(), match args.format { ExportFormat::Sft => "SFT", ExportFormat::Dpo => "DPO" }, path.display());
        }
    }
    Ok(exit::OK)
}

fn review(args: ReviewArgs) -> Outcome {
    let json = args.inner.common.json.json;
    let pipeline = load(&args.inner.common.file)?;
    let store = store_for(&pipeline, &args.inner.store);
    let review = review::Review::load(&pipeline, &store, args.iteration, args.labels).map_err(Failure::Store)?;
    let (n, labels) = (review.len(), review.labels_path().to_path_buf());
    let ready = |addr: std::net::SocketAddr| {
        let url = format!("http://{addr}/");
        if json {
            println!("{}", serde_json::json!({"url": url, "traces": n, "labels": labels}));
        } else {
            println!("review {n} traces of `{}` at {url}\nlabels are saved to {} — Ctrl-C to stop", pipeline.name, labels.display());
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
    };
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    runtime().block_on(review::serve(review, args.port, ready, shutdown)).map_err(Failure::Usage)?;
    Ok(exit::OK)
}

fn check(args: &CheckArgs) -> Outcome {
    let json = args.inner.common.json.json;
    if !(args.alpha > 0.0 && args.alpha < 1.0) {
        return Err(Failure::Usage(format!("--alpha {} must be above 0 and below 1", args.alpha)));
    }
    let pipeline = load(&args.inner.common.file)?;
    let store = store_for(&pipeline, &args.inner.store);
    let current = compare::Side::load(&args.inner.common.file.display().to_string(), &pipeline, &store, None).map_err(Failure::Store)?;
    let baseline = if args.baseline.ends_with(".lock") {
        let lock = match engine::lockfile::Lockfile::read(Path::new(&args.baseline)) {
            Ok(Some(lock)) => lock,
            Ok(None) => return Err(Failure::Usage(format!("--baseline: there is no lockfile at {}", args.baseline))),
            Err(d) => return Err(Failure::LockfileInvalid(d)),
        };
        compare::Side::from_lock(&args.baseline, &lock, &pipeline, &store).map_err(Failure::Store)?
    } else {
        recorded_run(&args.baseline, &args.inner.store)?.0
    };
    let c = compare::check(&baseline, &current, args.alpha, pipeline.seed);
    if json {
        println!("{}", serde_json::to_string(&c).expect("JSON"));
    } else {
        output::stdout(&compare::render_check(&c));
    }
    Ok(if c.regressed { exit::REGRESSED } else { exit::OK })
}

/// A recorded run named as `compare` and `check` take it: a pipeline file's last run, or `FILE@N`
/// for iteration N of it; with its pipeline's seed.
fn recorded_run(spec: &str, store: &Option<PathBuf>) -> Result<(compare::Side, u64), Failure> {
    let (file, iteration) = match spec.rsplit_once('@') {
        Some((file, n)) if n.parse::<u32>().is_ok_and(|n| n > 0) => (file, n.parse().ok()),
        _ => (spec, None),
    };
    let pipeline = load(Path::new(file))?;
    let side = compare::Side::load(spec, &pipeline, &store_for(&pipeline, store), iteration).map_err(Failure::Store)?;
    Ok((side, pipeline.seed))
}

fn compare_runs(args: &CompareArgs) -> Outcome {
    let json = args.json.json;
    let mut sides = Vec::new();
    let mut seed = 0;
    for spec in [&args.a, &args.b] {
        let (side, s) = recorded_run(spec, &args.store)?;
        sides.push(side);
        seed = s;
    }
    let c = compare::compare(&sides[0], &sides[1], seed);
    if json {
        println!("{}", serde_json::to_string(&c).expect("JSON"));
    } else {
        output::stdout(&compare::render(&c));
    }
    Ok(exit::OK)
}
