//! `command`: run a program of your own as a stage (a custom metric, an export, a report).
//!
//! The program gets `{"inputs": {<upstream id>: <artifact>, ...}, "seed": N}` as JSON on stdin
//! and must print its output artifact as JSON on stdout. It runs in the pipeline file's directory,
//! without a shell. Its fingerprint covers `run`, the digests of `files` and of the inputs, and
//! the seed — list the scripts it reads in `files` so that editing them reruns it.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::diag::Diagnostic;
use engine::stage::ANY;
use engine::{BuildContext, FileRef, Item, Port, Stage, StageError, StageInput, StagePlugin};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub struct Command;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// Program and arguments, run without a shell in the pipeline file's directory.
    pub run: Vec<String>,
    /// Files the program reads (its script, say): digested into the fingerprint.
    #[serde(default)]
    pub files: Vec<FileRef>,
    /// Kill the program after this many seconds.
    pub timeout_s: Option<u64>,
}

impl StagePlugin for Command {
    type Config = CommandConfig;
    const KIND: &'static str = "command";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "run a program: upstream artifacts as JSON on stdin, its output artifact as JSON on stdout";
    const INPUTS: &'static [Port] = &[Port::new("inputs", ANY)];
    const OUTPUT: &'static str = "json";

    fn build(config: CommandConfig, cx: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        let mut errors = Vec::new();
        if config.run.is_empty() || config.run[0].is_empty() {
            errors.push(cx.error_at(cx.key("run"), "`run` needs at least the program to run", ""));
        }
        for f in &config.files {
            if let Err(d) = cx.file(f) {
                errors.push(d);
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let dir = std::path::absolute(cx.base_dir).unwrap_or_else(|_| cx.base_dir.to_path_buf());
        Ok(Arc::new(CommandStage { config, dir }))
    }
}

struct CommandStage {
    config: CommandConfig,
    dir: PathBuf,
}

impl Stage for CommandStage {
    fn metrics(&self) -> Option<&'static [&'static str]> {
        None
    }

    fn finish(&self, input: &StageInput, _: Vec<(Item, Value)>) -> Result<Value, StageError> {
        std::thread::scope(|scope| self.run(scope, input))
    }
}

/// The pipe to the program's stdin holds this much (Linux's default is 64 KiB): a program
/// reading a large input in large blocks then wakes once a megabyte, not sixteen times
/// (BENCHMARKS.md: 150 MB into Python's `read(1 << 20)`, 0.43-0.70 s -> 0.18-0.22 s).
const PIPE_BYTES: usize = 1 << 20;

/// Asks for a pipe of [`PIPE_BYTES`]; where it cannot be had (another system, a lower
/// `/proc/sys/fs/pipe-max-size`) the pipe stays as it was, which only costs time.
fn widen_pipe(pipe: &std::process::ChildStdin) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: F_SETPIPE_SZ reads no memory; the descriptor is the open pipe `pipe` owns.
        let got = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES as libc::c_int) };
        if got < 0 {
            tracing::debug!("the pipe to the command's stdin keeps its size: {}", std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = pipe;
}

impl CommandStage {
    fn run<'s>(&self, scope: &'s std::thread::Scope<'s, '_>, input: &'s StageInput) -> Result<Value, StageError> {
        let program = &self.config.run[0];
        let mut child = std::process::Command::new(program)
            .args(&self.config.run[1..])
            .current_dir(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| StageError::new(format!("cannot start `{program}`: {e}")))?;
        let child_in = child.stdin.take().expect("piped");
        widen_pipe(&child_in);
        // `{"inputs": {<port>: <artifact>, ...}, "seed": N}`, each artifact copied from the store
        // as it is written (never parsed here).
        let writer = scope.spawn(move || -> Result<(), StageError> {
            let mut w = std::io::BufWriter::with_capacity(PIPE_BYTES, child_in);
            let io = |e: std::io::Error| StageError::new(e.to_string());
            w.write_all(b"{\"inputs\":{").map_err(io)?;
            for (i, port) in input.ports().into_iter().enumerate() {
                let key = serde_json::to_string(port).expect("a string serializes");
                w.write_all(format!("{}{key}:", if i > 0 { "," } else { "" }).as_bytes()).map_err(io)?;
                input.write_json(port, &mut w)?;
            }
            w.write_all(format!("}},\"seed\":{}}}", input.seed).as_bytes()).map_err(io)?;
            w.flush().map_err(io)
        });
        let mut out = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            out.read_to_end(&mut buf).map(|_| buf)
        });
        let err_reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = err.read_to_end(&mut buf);
            buf
        });
        let deadline = self.config.timeout_s.map(|s| Instant::now() + Duration::from_secs(s));
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| StageError::new(format!("`{program}`: {e}")))? {
                break status;
            }
            if input.cancel.is_set() {
                let _ = child.kill();
                let _ = child.wait();
                return Err(StageError::new(format!("`{program}` stopped: the run was interrupted")));
            }
            if deadline.is_some_and(|d| Instant::now() > d) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(StageError::new(format!("`{program}` ran past timeout_s = {}", self.config.timeout_s.unwrap_or(0))));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // A program that exits without reading stdin closes the pipe: not an error by itself.
        let written = writer.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        let stdout = reader.join().expect("reader thread").map_err(|e| StageError::new(format!("reading `{program}` output: {e}")))?;
        let stderr = err_reader.join().expect("reader thread");
        if !status.success() {
            let tail: Vec<&str> = std::str::from_utf8(&stderr).unwrap_or("").lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            let unwritten = written.err().map(|e| format!(" (its input could not all be written: {})", e.message)).unwrap_or_default();
            return Err(StageError::new(format!("`{program}` failed ({status}){unwritten}:\n{}", tail.join("\n"))));
        }
        if stdout.iter().all(u8::is_ascii_whitespace) {
            return Err(StageError::new(format!("`{program}` printed nothing; a command stage must print its output as JSON")));
        }
        serde_json::from_slice(&stdout).map_err(|e| StageError::new(format!("`{program}` did not print JSON: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;

    #[cfg(target_os = "linux")]
    #[test]
    fn the_pipe_to_the_programs_stdin_is_widened() {
        use std::os::fd::AsRawFd;
        let mut child = std::process::Command::new("cat").stdin(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        // SAFETY: F_GETPIPE_SZ reads no memory; `stdin` is open.
        let size = || unsafe { libc::fcntl(stdin.as_raw_fd(), libc::F_GETPIPE_SZ) };
        assert!(usize::try_from(size()).unwrap() < PIPE_BYTES);
        widen_pipe(&stdin);
        assert_eq!(usize::try_from(size()).unwrap(), PIPE_BYTES);
        drop(stdin);
        child.wait().unwrap();
    }

    fn run(argv: &[&str]) -> Result<Value, StageError> {
        let stage = CommandStage {
            config: CommandConfig { run: argv.iter().map(|s| s.to_string()).collect(), files: vec![], timeout_s: Some(10) },
            dir: std::env::temp_dir(),
        };
        let input = StageInput::new(BTreeMap::from([("a".to_string(), Arc::new(json!([1, 2, 3])))]), BTreeMap::new(), 9);
        stage.finish(&input, vec![])
    }

    #[test]
    fn passes_inputs_on_stdin_and_reads_json_from_stdout() {
        let out = run(&["python3", "-c", "import json,sys; d=json.load(sys.stdin); print(json.dumps({'sum': sum(d['inputs']['a']), 'seed': d['seed']}))"]);
        assert_eq!(out.unwrap(), json!({"sum": 6, "seed": 9}));
    }

    #[test]
    fn failures_say_what_happened() {
        let e = run(&["python3", "-c", "import sys; print('bad input', file=sys.stderr); sys.exit(3)"]).unwrap_err();
        assert!(e.message.contains("failed (exit status: 3):\nbad input"), "{}", e.message);
        assert!(run(&["python3", "-c", "print('not json')"]).unwrap_err().message.contains("did not print JSON"));
        assert!(run(&["true"]).unwrap_err().message.contains("printed nothing"));
        assert!(run(&["no-such-program-xyz"]).unwrap_err().message.starts_with("cannot start"));
    }

    #[test]
    fn timeout_kills_the_program() {
        let stage = CommandStage {
            config: CommandConfig { run: vec!["sleep".into(), "30".into()], files: vec![], timeout_s: Some(1) },
            dir: std::env::temp_dir(),
        };
        let input = StageInput::new(BTreeMap::new(), BTreeMap::new(), 0);
        let started = Instant::now();
        assert!(stage.finish(&input, vec![]).unwrap_err().message.contains("timeout_s = 1"));
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
