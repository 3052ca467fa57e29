//! Metrics: `metrics.jsonl` (one JSON object per line, flushed each line) and a one-line
//! progress display on stderr (indicatif).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainerError};

/// File name of the metrics log inside the output folder.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// One optimizer step (written every `train.log_interval` steps).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    pub step: u64,
    /// Mean loss per counted token over the global batch.
    pub loss: f32,
    pub lr: f64,
    /// Global gradient norm before clipping (when computed).
    pub grad_norm: Option<f32>,
    /// Dynamic loss scale (f16 only).
    pub loss_scale: Option<f32>,
    /// Steps skipped so far for inf/nan gradients.
    pub skipped_steps: u64,
    pub tokens_per_s: f64,
    /// Model-state bytes held by each rank.
    pub mem_bytes_per_rank: Vec<u64>,
}

/// One evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: u64,
    pub eval_loss: f32,
    pub perplexity: f32,
    /// Exact-match accuracy (addition), when measured.
    pub accuracy: Option<f32>,
}

/// A line of `metrics.jsonl`: `{"kind":"train",...}` or `{"kind":"eval",...}`.
///
/// Non-finite floats are written as `null` (JSON has no NaN) and read back as NaN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Record {
    Train(TrainRecord),
    Eval(EvalRecord),
}

/// Appends records to `output_dir/metrics.jsonl`, flushing after every line.
#[derive(Debug)]
pub struct MetricsWriter {
    file: File,
    path: PathBuf,
}

impl MetricsWriter {
    /// Opens (creating the folder and file if needed) `output_dir/metrics.jsonl` for appending.
    pub fn create(output_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(output_dir).map_err(|e| TrainerError::io(output_dir, e))?;
        let path = output_dir.join(METRICS_FILE);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| TrainerError::io(&path, e))?;
        Ok(Self { file, path })
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record as a line and flushes it.
    pub fn write(&mut self, record: &Record) -> Result<()> {
        let mut line = serde_json::to_string(record).map_err(|e| TrainerError::Data {
            path: self.path.clone(),
            reason: format!("cannot encode a metrics record: {e}"),
        })?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| TrainerError::io(&self.path, e))
    }

    /// Appends a [`TrainRecord`].
    pub fn train(&mut self, record: TrainRecord) -> Result<()> {
        self.write(&Record::Train(record))
    }

    /// Appends an [`EvalRecord`].
    pub fn eval(&mut self, record: EvalRecord) -> Result<()> {
        self.write(&Record::Eval(record))
    }
}

/// Reads a `metrics.jsonl` (e.g. to plot it); a bad line is an error naming `file:line`.
pub fn read_metrics(path: &Path) -> Result<Vec<Record>> {
    let file = File::open(path).map_err(|e| TrainerError::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| TrainerError::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str::<RecordIn>(&line)
                .map_err(|e| TrainerError::DataLine {
                    path: path.into(),
                    line: i + 1,
                    reason: e.to_string(),
                })?
                .into(),
        );
    }
    Ok(out)
}

/// `(step, loss)` of the train records and `(step, eval_loss)` of the eval records, for
/// [`crate::plot::write_loss_svg`].
pub type LossSeries = (Vec<(u64, f32)>, Vec<(u64, f32)>);

/// The loss curves of a list of records.
pub fn loss_series(records: &[Record]) -> LossSeries {
    let mut train = Vec::new();
    let mut eval = Vec::new();
    for r in records {
        match r {
            Record::Train(t) => train.push((t.step, t.loss)),
            Record::Eval(e) => eval.push((e.step, e.eval_loss)),
        }
    }
    (train, eval)
}

// Reading: floats written as null (non-finite) come back as NaN.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum RecordIn {
    Train {
        step: u64,
        loss: Option<f32>,
        lr: Option<f64>,
        grad_norm: Option<f32>,
        loss_scale: Option<f32>,
        skipped_steps: u64,
        tokens_per_s: Option<f64>,
        mem_bytes_per_rank: Vec<u64>,
    },
    Eval {
        step: u64,
        eval_loss: Option<f32>,
        perplexity: Option<f32>,
        accuracy: Option<f32>,
    },
}

impl From<RecordIn> for Record {
    fn from(r: RecordIn) -> Self {
        match r {
            RecordIn::Train {
                step,
                loss,
                lr,
                grad_norm,
                loss_scale,
                skipped_steps,
                tokens_per_s,
                mem_bytes_per_rank,
            } => Record::Train(TrainRecord {
                step,
                loss: loss.unwrap_or(f32::NAN),
                lr: lr.unwrap_or(f64::NAN),
                grad_norm,
                loss_scale,
                skipped_steps,
                tokens_per_s: tokens_per_s.unwrap_or(f64::NAN),
                mem_bytes_per_rank,
            }),
            RecordIn::Eval {
                step,
                eval_loss,
                perplexity,
                accuracy,
            } => Record::Eval(EvalRecord {
                step,
                eval_loss: eval_loss.unwrap_or(f32::NAN),
                perplexity: perplexity.unwrap_or(f32::NAN),
                accuracy,
            }),
        }
    }
}

/// What the progress line shows after a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProgressStats {
    /// Steps done (1-based after the first step).
    pub step: u64,
    pub loss: f32,
    pub tokens_per_s: f64,
    pub lr: f64,
    pub loss_scale: Option<f32>,
}

/// The progress bar on stderr: an indicatif bar on a terminal; when stderr is not a terminal
/// (a log file, CI) the bar is hidden and a plain line is written every `log_interval` steps
/// and at the end.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    /// Plain lines (stderr not a terminal).
    lines: Option<Lines>,
    first_step: Option<u64>,
    start: Instant,
    log_interval: u64,
}

struct Lines(Box<dyn Write + Send>);

impl std::fmt::Debug for Lines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lines")
    }
}

const BAR_WIDTH: usize = 24;

impl Progress {
    /// Progress to `total` steps on stderr.
    pub fn new(total: u64, log_interval: u64) -> Self {
        let lines = (!std::io::stderr().is_terminal())
            .then(|| Box::new(std::io::stderr()) as Box<dyn Write + Send>);
        Self::with_target(total, log_interval, ProgressDrawTarget::stderr(), lines)
    }

    /// Progress drawn on `target`, and written as plain lines to `lines` when given.
    pub fn with_target(
        total: u64,
        log_interval: u64,
        target: ProgressDrawTarget,
        lines: Option<Box<dyn Write + Send>>,
    ) -> Self {
        let width = total.to_string().len();
        let style = ProgressStyle::with_template(&format!(
            "{{pos:>{width}}}/{{len}} [{{bar:{BAR_WIDTH}}}] {{msg}}"
        ))
        .expect("a valid progress template")
        .progress_chars("##-");
        let bar = ProgressBar::with_draw_target(Some(total), target).with_style(style);
        Self {
            bar,
            lines: lines.map(Lines),
            first_step: None,
            start: Instant::now(),
            log_interval: log_interval.max(1),
        }
    }

    /// Shows the state after a step. Write errors on stderr are ignored (progress is cosmetic).
    pub fn update(&mut self, stats: &ProgressStats) {
        // The rate counts from the first step seen, so a resumed run has a correct ETA.
        let first = *self.first_step.get_or_insert(stats.step.saturating_sub(1));
        let done = stats.step.saturating_sub(first);
        let total = self.bar.length().unwrap_or(0);
        let eta = (done > 0).then(|| {
            let per_step = self.start.elapsed().as_secs_f64() / done as f64;
            Duration::from_secs_f64(per_step * total.saturating_sub(stats.step) as f64)
        });
        self.bar.set_message(format_fields(stats, eta));
        self.bar.set_position(stats.step);
        if let Some(Lines(out)) = self.lines.as_mut()
            && (stats.step.is_multiple_of(self.log_interval) || stats.step >= total)
        {
            let _ = writeln!(out, "{}", format_line(stats, total, eta));
            let _ = out.flush();
        }
    }

    /// Prints a message on its own line without breaking the bar (e.g. an eval result).
    pub fn println(&mut self, message: &str) {
        match self.lines.as_mut() {
            Some(Lines(out)) => {
                let _ = writeln!(out, "{message}");
                let _ = out.flush();
            }
            None => self.bar.println(message),
        }
    }

    /// Ends the bar, leaving its last state on screen (call once after the last step).
    pub fn finish(&mut self) {
        if self.bar.is_finished() {
            return;
        }
        self.bar.abandon();
        // indicatif leaves the cursor at the end of the bar's line: end the line.
        if self.lines.is_none() && !self.bar.is_hidden() {
            eprintln!();
        }
    }

    /// The bar's position and message (what a terminal shows after `pos/len [bar]`).
    #[cfg(test)]
    fn state(&self) -> (u64, String) {
        (self.bar.position(), self.bar.message())
    }
}

/// The plain progress line: `step/total [bar] ` then [`format_fields`].
pub fn format_line(stats: &ProgressStats, total: u64, eta: Option<Duration>) -> String {
    let frac = if total == 0 {
        1.0
    } else {
        (stats.step as f64 / total as f64).clamp(0.0, 1.0)
    };
    let filled = (frac * BAR_WIDTH as f64).round() as usize;
    let bar: String = "#".repeat(filled) + &"-".repeat(BAR_WIDTH - filled);
    let width = total.to_string().len();
    format!(
        "{:>width$}/{total} [{bar}] {}",
        stats.step,
        format_fields(stats, eta)
    )
}

/// The fields after the bar: loss, tokens/s, lr, loss scale (if any) and ETA.
pub fn format_fields(stats: &ProgressStats, eta: Option<Duration>) -> String {
    let mut line = format!(
        "loss {:.4} | {} tok/s | lr {:.2e}",
        stats.loss,
        human(stats.tokens_per_s),
        stats.lr,
    );
    if let Some(scale) = stats.loss_scale {
        line += &format!(" | scale {scale}");
    }
    line += &match eta {
        Some(eta) => format!(" | ETA {}", clock(eta)),
        None => " | ETA --:--".into(),
    };
    line
}

fn human(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn clock(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{:02}:{:02}", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("kiln-metrics-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn train(step: u64, loss: f32) -> TrainRecord {
        TrainRecord {
            step,
            loss,
            lr: 1e-3,
            grad_norm: Some(0.5),
            loss_scale: None,
            skipped_steps: 0,
            tokens_per_s: 1234.5,
            mem_bytes_per_rank: vec![10, 20],
        }
    }

    #[test]
    fn writes_one_json_object_per_line_and_reads_back() {
        let dir = temp_dir("jsonl").join("run");
        let mut w = MetricsWriter::create(&dir).unwrap();
        w.train(train(10, 2.5)).unwrap();
        w.eval(EvalRecord {
            step: 10,
            eval_loss: 2.0,
            perplexity: 2f32.exp(),
            accuracy: Some(0.25),
        })
        .unwrap();
        w.train(train(20, f32::NAN)).unwrap();
        drop(w);
        // Appends on reopen (a resumed run).
        MetricsWriter::create(&dir)
            .unwrap()
            .train(train(30, 1.5))
            .unwrap();

        let text = std::fs::read_to_string(dir.join(METRICS_FILE)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        for l in &lines {
            assert!(
                serde_json::from_str::<serde_json::Value>(l)
                    .unwrap()
                    .is_object()
            );
        }
        assert!(lines[0].contains("\"kind\":\"train\"") && lines[0].contains("\"step\":10"));
        assert!(lines[1].contains("\"accuracy\":0.25"));
        assert!(lines[2].contains("\"loss\":null"));

        let records = read_metrics(&dir.join(METRICS_FILE)).unwrap();
        assert_eq!(records.len(), 4);
        assert_eq!(records[0], Record::Train(train(10, 2.5)));
        let (t, e) = loss_series(&records);
        assert_eq!(t.len(), 3);
        assert!(t[1].1.is_nan());
        assert_eq!(e, vec![(10, 2.0)]);

        std::fs::write(dir.join("bad.jsonl"), "{\"kind\":\"train\"}\n").unwrap();
        let err = read_metrics(&dir.join("bad.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.jsonl:1"), "{err}");
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn stats(step: u64) -> ProgressStats {
        ProgressStats {
            step,
            loss: 1.25,
            tokens_per_s: 12_345.0,
            lr: 3e-4,
            loss_scale: Some(65536.0),
        }
    }

    #[test]
    fn progress_line_and_modes() {
        let line = format_line(&stats(50), 100, Some(Duration::from_secs(75)));
        assert!(
            line.starts_with(" 50/100 [############------------]"),
            "{line}"
        );
        for part in [
            "loss 1.2500",
            "12.3k tok/s",
            "lr 3.00e-4",
            "scale 65536",
            "ETA 01:15",
        ] {
            assert!(line.contains(part), "{part}: {line}");
        }
        assert!(format_line(&stats(0), 0, None).contains("ETA --:--"));

        let sink = Sink::default();
        let mut p = Progress::with_target(
            30,
            10,
            ProgressDrawTarget::hidden(),
            Some(Box::new(sink.clone())),
        );
        for s in 1..=25 {
            p.update(&stats(s));
        }
        p.println("eval loss 1.0");
        p.update(&stats(30));
        p.finish();
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("10/30") && lines[1].starts_with("20/30"));
        assert_eq!(lines[2], "eval loss 1.0");
        assert!(lines[3].starts_with("30/30 [########################]"));
        assert!(!text.contains('\r') && !text.contains('\x1b'));

        // On a terminal the bar (here hidden) holds the step and the fields; no plain lines.
        let mut p = Progress::with_target(3, 10, ProgressDrawTarget::hidden(), None);
        for s in 1..=3 {
            p.update(&stats(s));
        }
        let (pos, msg) = p.state();
        assert_eq!(pos, 3);
        for part in [
            "loss 1.2500",
            "12.3k tok/s",
            "lr 3.00e-4",
            "scale 65536",
            "ETA 00:00",
        ] {
            assert!(msg.contains(part), "{part}: {msg}");
        }
        p.println("eval loss 1.0");
        p.finish();
    }
}
