//! Results kept in the repository. A bench run with `--save NAME` records what it printed,
//! as headings, text and tables, with its command, date, machine and commit, in
//! `benches/results/NAME.json`; `migaccel-bench doc` renders `docs/benchmarks.md` from
//! those files alone. The page so shows the current results and nothing that no command
//! in the repository reproduces; earlier results live in git history.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Every line the bench printed through [`say`], in order.
static PRINTED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The commit and date when the run started: what was measured, whatever changes while it
/// runs.
static STARTED: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();

/// Note the commit and date a saved run measures, before it starts.
pub fn begin() {
    STARTED.get_or_init(|| (commit(), output("date", &["-u", "+%Y-%m-%d"]).unwrap_or_default()));
}

/// Print a line of results and keep it for `--save`.
pub fn say_line(line: String) {
    println!("{line}");
    PRINTED.lock().unwrap_or_else(|e| e.into_inner()).extend(line.split('\n').map(String::from));
}

/// `println!` for results: printed, and kept for `--save`.
macro_rules! say {
    () => {
        $crate::results::say_line(String::new())
    };
    ($($t:tt)*) => {
        $crate::results::say_line(format!($($t)*))
    };
}
pub(crate) use say;

/// One piece of a run's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Block {
    /// A heading the bench printed (`#` count as `level`).
    Heading { level: usize, text: String },
    /// Lines of prose or figures, as printed.
    Text { lines: Vec<String> },
    /// A table: its column names and its rows of cells.
    Table { columns: Vec<String>, rows: Vec<Vec<String>> },
}

/// One saved bench run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// The file's name without `.json`.
    pub name: String,
    /// The command that produced it, as a user types it.
    pub command: String,
    /// UTC date of the run.
    pub date: String,
    /// CPU model, cores, memory and kernel of the machine.
    pub machine: String,
    /// Commit of the code measured (`-dirty` if it had changes besides results and docs).
    pub commit: String,
    pub blocks: Vec<Block>,
}

impl Run {
    /// The bench the run is of (`vs-qemu`, `transport`, …): the word after `./dev bench`.
    fn bench(&self) -> &str {
        self.command.split_whitespace().nth(2).unwrap_or(&self.name)
    }

    /// The run's heading on the page.
    fn title(&self) -> String {
        format!("{}: {}", self.bench(), self.name)
    }
}

/// Cells of a table row `| a | b |`.
fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(|c| c.trim().to_string()).collect()
}

/// A table's separator row (`|---|:--:|`).
fn is_separator(line: &str) -> bool {
    let t = line.trim();
    t.starts_with('|') && t.chars().all(|c| matches!(c, '|' | '-' | ':' | ' '))
}

/// Cut printed lines into blocks: `#` lines are headings, runs of `|` lines tables, runs of
/// other non-empty lines text.
pub fn blocks(lines: &[String]) -> Vec<Block> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = &lines[i];
        if l.trim().is_empty() {
            i += 1;
        } else if l.starts_with('#') {
            let level = l.chars().take_while(|&c| c == '#').count();
            out.push(Block::Heading { level, text: l[level..].trim().to_string() });
            i += 1;
        } else if l.trim_start().starts_with('|') {
            let columns = cells(l);
            let mut rows = Vec::new();
            i += 1;
            while i < lines.len() && lines[i].trim_start().starts_with('|') {
                if !is_separator(&lines[i]) {
                    rows.push(cells(&lines[i]));
                }
                i += 1;
            }
            out.push(Block::Table { columns, rows });
        } else {
            let mut text = Vec::new();
            while i < lines.len()
                && !lines[i].trim().is_empty()
                && !lines[i].starts_with('#')
                && !lines[i].trim_start().starts_with('|')
            {
                text.push(lines[i].clone());
                i += 1;
            }
            out.push(Block::Text { lines: text });
        }
    }
    out
}

/// What each bench measures, said once above its results.
fn about(bench: &str) -> &'static str {
    match bench {
        "vs-qemu" => {
            "QEMU's own migration of a QEMU guest beside migaccel's, on the same machine in the same run: \
             same RAM, same guest classes (idle and prefilled, a hot range written at full speed, all RAM \
             written at full speed), the systems interleaved per cell. `QEMU + migaccel` is migaccel attached \
             to both QEMU processes (`send`/`receive --qemu-pid`), moving RAM itself while QEMU moves the \
             devices; `sealed` is migaccel's default authenticated channel, set against QEMU with TLS."
        }
        "transport" => {
            "Transport-bound migrations (idle guest, RAM filled by the host): throughput and CPU per GiB per \
             transport mode, channel and stream count, beside the same run's loopback and cipher ceilings."
        }
        "mh" => {
            "The in-guest Migration Handler: export+import throughput per batch size and handler vCPU count \
             against the same run's single-core AES-256-GCM ceiling times the handler vCPUs, the cost of a \
             doorbell, and whole migrations of filled guests with the default settings, plain against \
             confidential (pipelined, one batch at a time, and on two handler vCPUs per side). Where the \
             targets are missed and why: `docs/performance.md`."
        }
        "migrate" => {
            "Live migrations of the embedded guest with idle, hot and `ab` workloads beside the same run's \
             loopback TCP ceiling and a guest-RAM stream without the engine."
        }
        "ebpf" => {
            "What the eBPF dirty probe costs a guest that writes (its dirtying rate without a program, with the \
             probe, with an empty program on the same tracepoint), the probe's kernel-counted run time, and \
             harvest cost per page."
        }
        _ => "",
    }
}

/// The Markdown of one run.
pub fn render_run(r: &Run) -> String {
    let mut s = format!("## {}\n\n", r.title());
    let a = about(r.bench());
    if !a.is_empty() {
        s += a;
        s += "\n\n";
    }
    s += &format!("```sh\n{}\n```\n\n", r.command);
    s += &format!("{} · {} · commit `{}`\n\n", r.date, r.machine, r.commit);
    for b in &r.blocks {
        match b {
            Block::Heading { level, text } => s += &format!("{} {text}\n\n", "#".repeat((level + 2).min(6))),
            Block::Text { lines } => {
                for l in lines {
                    s += l;
                    s += "  \n";
                }
                s += "\n";
            }
            Block::Table { columns, rows } => {
                s += &format!("| {} |\n", columns.join(" | "));
                s += &format!("|{}\n", "---|".repeat(columns.len()));
                for row in rows {
                    s += &format!("| {} |\n", row.join(" | "));
                }
                s += "\n";
            }
        }
    }
    s
}

/// The order of the page: the comparison users care about first.
const ORDER: [&str; 5] = ["vs-qemu", "transport", "mh", "migrate", "ebpf"];

fn rank(r: &Run) -> (usize, String) {
    (ORDER.iter().position(|o| *o == r.bench()).unwrap_or(ORDER.len()), r.name.clone())
}

/// The whole results page.
pub fn render_page(runs: &[Run]) -> String {
    let mut runs = runs.to_vec();
    runs.sort_by_key(rank);
    let mut s = String::from(
        "# migaccel benchmarks\n\n\
         Generated by `./dev bench doc` from `benches/results/*.json`, which bench runs write with \
         `--save NAME`; edit those runs, not this page (`cargo test -p migaccel-benches` fails when the page \
         and the results differ). Every figure sits beside a baseline measured in the same run, because this \
         machine's numbers move from run to run. What bounds the figures, with profiles, is in \
         [performance.md](performance.md).\n\n",
    );
    for r in &runs {
        s += &format!("- [{}](#{}) ({})\n", r.title(), anchor(&r.title()), r.date);
    }
    s += "\n";
    for r in &runs {
        s += &render_run(r);
    }
    s
}

/// GitHub's anchor of a heading.
fn anchor(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            'a'..='z' | '0'..='9' | '-' | '_' => Some(c),
            ' ' => Some('-'),
            _ => None,
        })
        .collect()
}

/// The workspace root (benches' parent folder).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("benches has a parent").to_path_buf()
}

/// Every saved run under `dir`.
pub fn load(dir: &Path) -> anyhow::Result<Vec<Run>> {
    let mut runs = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "json") {
            let text = std::fs::read_to_string(&p).with_context(|| format!("{}", p.display()))?;
            runs.push(serde_json::from_str(&text).with_context(|| format!("{}", p.display()))?);
        }
    }
    Ok(runs)
}

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd).args(args).current_dir(root()).output().ok()?;
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// CPU model, cores, memory and kernel.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find(|l| l.starts_with("MemTotal")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| format!("{:.1} GiB", kib as f64 / (1 << 20) as f64))
        .unwrap_or_else(|| "? GiB".into());
    let kernel =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default();
    format!("{cpu}, {cores} cores, {mem} RAM, Linux {kernel}")
}

/// The commit measured, `-dirty` if code (not results or docs) had changes.
fn commit() -> String {
    let head = output("git", &["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        output("git", &["status", "--porcelain", "--untracked-files=no", "--", ".", ":!benches/results", ":!docs"])
            .is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{head}-dirty")
    } else {
        head
    }
}

/// The command as a user types it, without `--save`.
fn command(args: &[String]) -> String {
    let mut out = vec!["./dev".to_string(), "bench".to_string()];
    let mut skip = false;
    for a in args.iter().skip(1) {
        if skip {
            skip = false;
            continue;
        }
        if a == "--save" {
            skip = true;
            continue;
        }
        if a.starts_with("--save=") {
            continue;
        }
        out.push(if a.contains(' ') { format!("\"{a}\"") } else { a.clone() });
    }
    out.join(" ")
}

/// Write what this run printed to `benches/results/NAME.json`.
pub fn save(name: &str) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "--save {name:?}: use letters, digits, '-' and '_'"
    );
    let lines = PRINTED.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let args: Vec<String> = std::env::args().collect();
    begin();
    let (commit, date) = STARTED.get().cloned().unwrap_or_default();
    let run = Run {
        name: name.to_string(),
        command: command(&args),
        date,
        machine: machine(),
        commit,
        blocks: blocks(&lines),
    };
    let dir = root().join("benches/results");
    std::fs::create_dir_all(&dir)?;
    let p = dir.join(format!("{name}.json"));
    std::fs::write(&p, serde_json::to_string_pretty(&run)? + "\n").with_context(|| format!("{}", p.display()))?;
    Ok(p)
}

/// Render `docs/benchmarks.md` from the saved runs (or, with `check`, say whether it is current).
pub fn doc(check: bool) -> anyhow::Result<()> {
    let page = render_page(&load(&root().join("benches/results"))?);
    let p = root().join("docs/benchmarks.md");
    if check {
        let now = std::fs::read_to_string(&p).unwrap_or_default();
        anyhow::ensure!(now == page, "{} is not the rendering of benches/results: run `./dev bench doc`", p.display());
        eprintln!("{} is current", p.display());
    } else {
        std::fs::write(&p, page).with_context(|| format!("{}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_lines_become_headings_text_and_tables() {
        let lines: Vec<String> = [
            "# vs-qemu: 1 repetition",
            "",
            "| RAM | system | total ms |",
            "|---|---|---:|",
            "| 1024 MiB | QEMU | 3162 |",
            "| 1024 MiB | migaccel | 694 |",
            "",
            "Medians over repetitions.",
            "second line",
            "## ceilings",
            "iperf3: 4.1 GiB/s",
        ]
        .map(String::from)
        .into();
        let b = blocks(&lines);
        assert_eq!(
            b,
            vec![
                Block::Heading { level: 1, text: "vs-qemu: 1 repetition".into() },
                Block::Table {
                    columns: vec!["RAM".into(), "system".into(), "total ms".into()],
                    rows: vec![
                        vec!["1024 MiB".into(), "QEMU".into(), "3162".into()],
                        vec!["1024 MiB".into(), "migaccel".into(), "694".into()],
                    ],
                },
                Block::Text { lines: vec!["Medians over repetitions.".into(), "second line".into()] },
                Block::Heading { level: 2, text: "ceilings".into() },
                Block::Text { lines: vec!["iperf3: 4.1 GiB/s".into()] },
            ]
        );
        let run = Run {
            name: "t".into(),
            command: "./dev bench vs-qemu --ram 1GiB".into(),
            date: "2026-12-07".into(),
            machine: "m".into(),
            commit: "abc".into(),
            blocks: b,
        };
        let md = render_run(&run);
        assert!(md.starts_with("## vs-qemu: t\n"), "{md}");
        assert!(md.contains("```sh\n./dev bench vs-qemu --ram 1GiB\n```"), "{md}");
        assert!(md.contains("| 1024 MiB | migaccel | 694 |\n"), "{md}");
        assert!(md.contains("### vs-qemu: 1 repetition\n"), "{md}");
        // What the page shows is what the file holds: a round trip through JSON is exact.
        let back: Run = serde_json::from_str(&serde_json::to_string(&run).unwrap()).unwrap();
        assert_eq!(back, run);
    }

    #[test]
    fn the_command_is_the_users_without_save() {
        let args: Vec<String> =
            ["migaccel-bench", "transport", "--save", "x", "--ram", "1GiB", "--only", "QEMU multifd 4"]
                .map(String::from)
                .into();
        assert_eq!(command(&args), "./dev bench transport --ram 1GiB --only \"QEMU multifd 4\"");
    }

    #[test]
    fn the_results_page_is_the_rendering_of_the_saved_runs() {
        let runs = load(&root().join("benches/results")).expect("benches/results");
        assert!(runs.len() >= 4, "only {} saved runs", runs.len());
        for r in &runs {
            assert!(!r.blocks.is_empty() && r.command.starts_with("./dev bench "), "{}: empty or odd", r.name);
        }
        let page = std::fs::read_to_string(root().join("docs/benchmarks.md")).unwrap();
        assert!(page == render_page(&runs), "docs/benchmarks.md differs from benches/results: run `./dev bench doc`");
    }
}
