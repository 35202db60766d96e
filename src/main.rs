//! `pipeline`: parse arguments, call the engine, format for humans or `--json`.

mod compare;
mod output;
mod progress;
mod report;
mod review;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand, ValueEnum};
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
    /// Interrupted (Ctrl-C); finished work was kept.
    pub const INTERRUPTED: u8 = 130;
}

#[derive(Parser)]
#[command(
    name = "pipeline",
    version,
    about = "Find the smallest open model and prompt that is good enough for your task",
    long_about = "Pipelines are TOML files describing a DAG of stages. `pipeline` validates them like a \
compiler, plans and runs them incrementally (only what changed executes), and pins every input in a \
lockfile beside the pipeline.\n\nLogs: set RUST_LOG (e.g. RUST_LOG=engine=debug).",
    after_help = "Exit codes: 0 ok · 1 a stage failed · 2 invalid pipeline or arguments · 3 store busy or unwritable · 4 --locked mismatch · 130 interrupted"
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
    /// What moved between two runs (pipeline files, or `FILE@N` for iteration N of one): per
    /// candidate, held-out quality and its paired change with a 95% CI; per failure mode, its size.
    Compare(CompareArgs),
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

fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).min(8)
}

pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register::<cluster::Cluster>()
        .register::<command::Command>()
        .register::<dataset::Dataset>()
        .register::<infer::Infer>()
        .register::<judge::Judge>()
        .register::<llm_judge::LlmJudge>()
        .register::<license_filter::LicenseFilter>()
        .register::<prompt::Prompt>()
        .register::<prompt::Render>()
        .register::<revise::Revise>()
        .register::<select::Select>();
    r
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
    ExitCode::from(match cli.command {
        Command::Validate(args) => validate(&args),
        Command::Plan(args) => plan(&args),
        Command::Run(args) => run(args),
        Command::Graph(args) => graph(&args),
        Command::Show(args) => show(&args),
        Command::Compare(args) => compare_runs(&args),
        Command::Schema { of } => {
            let schema = match of {
                SchemaOf::Pipeline => engine::schema::pipeline_schema(&registry()),
                SchemaOf::Catalog => catalog::schema(),
            };
            output::stdout(&engine::schema::render(&schema));
            exit::OK
        }
        Command::Kinds(args) => {
            output::kinds(&registry(), args.json);
            exit::OK
        }
        Command::Review(args) => review(args),
        Command::Serve(args) => serve(&args),
    })
}

fn serve(args: &ServeArgs) -> u8 {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
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
    match runtime.block_on(infer::serve::serve(config, ready, shutdown)) {
        Ok(()) => exit::OK,
        Err(e) => error(&e, exit::INVALID, false),
    }
}

fn load(file: &Path, json: bool) -> Result<engine::Pipeline, u8> {
    engine::load(file, &registry()).map_err(|diags| {
        output::diagnostics(&diags, json);
        exit::INVALID
    })
}

fn store_for(pipeline: &engine::Pipeline, store: &Option<PathBuf>) -> Store {
    Store::new(store.clone().unwrap_or_else(|| pipeline.base_dir.join(".pipeline")))
}

fn validate(args: &Common) -> u8 {
    match load(&args.file, args.json.json) {
        Ok(p) => {
            output::valid(&p, args.json.json);
            exit::OK
        }
        Err(code) => code,
    }
}

fn plan(args: &WithStore) -> u8 {
    let pipeline = match load(&args.common.file, args.common.json.json) {
        Ok(p) => p,
        Err(code) => return code,
    };
    match engine::plan(&pipeline, &store_for(&pipeline, &args.store)) {
        Ok(plan) => {
            output::plan(&plan, args.common.json.json);
            exit::OK
        }
        Err(e) => error(&e.to_string(), exit::STORE, args.common.json.json),
    }
}

fn run(args: RunArgs) -> u8 {
    let json = args.inner.common.json.json;
    let pipeline = match load(&args.inner.common.file, json) {
        Ok(p) => Arc::new(p),
        Err(code) => return code,
    };
    let lock_path = engine::lockfile::path_for(&pipeline);
    let locked = if args.locked {
        match engine::lockfile::Lockfile::read(&lock_path) {
            Ok(Some(lock)) => Some(lock),
            Ok(None) => {
                return error(&format!("--locked: there is no lockfile at {}; run without --locked first", lock_path.display()), exit::LOCKED, json);
            }
            Err(d) => {
                output::diagnostics(&[d], json);
                return exit::LOCKED;
            }
        }
    } else {
        None
    };
    let store = store_for(&pipeline, &args.inner.store);
    let cancel = Arc::new(AtomicBool::new(false));
    let mut observers: Vec<Arc<dyn engine::Observer>> = vec![Arc::new(progress::Progress::new(!json))];
    if let Some(path) = &args.events {
        match progress::EventLog::create(path) {
            Ok(log) => observers.push(Arc::new(log)),
            Err(e) => return error(&format!("cannot open event log {}: {e}", path.display()), exit::STORE, json),
        }
    }
    let opts = engine::RunOptions { jobs: args.jobs, locked, observer: Arc::new(engine::events::Tee(observers)), cancel: cancel.clone() };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(async {
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
            let summaries: Vec<(String, String)> = report
                .iterations
                .last()
                .map(|it| {
                    it.stages
                        .iter()
                        // A fed stage's output is another stage's, summary included.
                        .filter(|s| s.status != engine::exec::Status::Fed)
                        .filter_map(|s| Some((s.id.clone(), store.get_object(&s.output?)?.get("summary")?.as_str()?.to_string())))
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
            match report.stop {
                engine::exec::StopReason::Failed => exit::STAGE_FAILED,
                engine::exec::StopReason::Interrupted => exit::INTERRUPTED,
                _ => exit::OK,
            }
        }
        Err(e @ engine::RunError::LockMismatch(_)) => error(&format!("--locked: {e}\n  the lockfile {} was left as it is", lock_path.display()), exit::LOCKED, json),
        // A full disk, a read-only or vanished store: say what survives and how to go on.
        Err(e @ engine::RunError::Store(engine::store::StoreError::Io { .. })) => error(
            &format!(
                "{e}\n  work that finished before this was kept, and the lockfile {} was left as it is; once the store can be written (free space, or `--store DIR`), the next run continues from there",
                lock_path.display()
            ),
            exit::STORE,
            json,
        ),
        Err(e) => error(&e.to_string(), exit::STORE, json),
    }
}

fn graph(args: &GraphArgs) -> u8 {
    match load(&args.file, matches!(args.format, GraphFormat::Json)) {
        Ok(p) => {
            output::stdout(&output::graph(&p, args.format));
            exit::OK
        }
        Err(code) => code,
    }
}

fn show(args: &ShowArgs) -> u8 {
    let json = args.inner.common.json.json;
    let pipeline = match load(&args.inner.common.file, json) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let store = store_for(&pipeline, &args.inner.store);
    let Some(report) = store.get_run::<engine::RunReport>(&pipeline.name) else {
        return error(&format!("`{}` has not been run yet (no run record in {})", pipeline.name, store.root().display()), exit::STORE, json);
    };
    if !pipeline.stages.iter().any(|s| s.id == args.stage) {
        let ids: Vec<&str> = pipeline.stages.iter().map(|s| s.id.as_str()).collect();
        return error(&format!("no stage `{}`; stages are: {}", args.stage, engine::diag::one_of(&ids)), exit::INVALID, json);
    }
    let iteration = args.iteration.map(|k| k.saturating_sub(1));
    let found = report.output(&args.stage, iteration).and_then(|d| store.get_object(&d).map(|v| (d, v)));
    match found {
        Some((_, value)) if args.diff => match output::prompt_diff(&value) {
            Some(diff) => {
                output::stdout(&diff);
                exit::OK
            }
            None => error(&format!("stage `{}` has no revised prompt here: `--diff` needs a prompt a `revise` stage wrote", args.stage), exit::INVALID, json),
        },
        Some((_, value)) => {
            output::stdout(&(serde_json::to_string_pretty(&value).expect("JSON") + "\n"));
            exit::OK
        }
        None => error(
            &format!(
                "stage `{}` has no output in {} of the last run ({} iteration(s))",
                args.stage,
                args.iteration.map_or("the last iteration".to_string(), |k| format!("iteration {k}")),
                report.iterations.len()
            ),
            exit::STORE,
            json,
        ),
    }
}

fn review(args: ReviewArgs) -> u8 {
    let json = args.inner.common.json.json;
    let pipeline = match load(&args.inner.common.file, json) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let store = store_for(&pipeline, &args.inner.store);
    let review = match review::Review::load(&pipeline, &store, args.iteration, args.labels) {
        Ok(r) => r,
        Err(e) => return error(&e, exit::STORE, json),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
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
    match runtime.block_on(review::serve(review, args.port, ready, shutdown)) {
        Ok(()) => exit::OK,
        Err(e) => error(&e, exit::INVALID, json),
    }
}

fn compare_runs(args: &CompareArgs) -> u8 {
    let json = args.json.json;
    let mut sides = Vec::new();
    let mut seed = 0;
    for spec in [&args.a, &args.b] {
        // `FILE@N`: iteration N of the file's last run.
        let (file, iteration) = match spec.rsplit_once('@') {
            Some((file, n)) if n.parse::<u32>().is_ok_and(|n| n > 0) => (file, n.parse().ok()),
            _ => (spec.as_str(), None),
        };
        let pipeline = match load(Path::new(file), json) {
            Ok(p) => p,
            Err(code) => return code,
        };
        seed = pipeline.seed;
        let store = store_for(&pipeline, &args.store);
        match compare::Side::load(spec, &pipeline, &store, iteration) {
            Ok(side) => sides.push(side),
            Err(e) => return error(&e, exit::STORE, json),
        }
    }
    let c = compare::compare(&sides[0], &sides[1], seed);
    if json {
        println!("{c}");
    } else {
        output::stdout(&compare::render(&c));
    }
    exit::OK
}

fn error(message: &str, code: u8, json: bool) -> u8 {
    if json {
        println!("{}", serde_json::json!({"ok": false, "error": message, "exit_code": code}));
    } else {
        eprintln!("{}", Diagnostic::error(message).render(output::color()));
    }
    code
}
