//! The embed job (SPEC §2.4, §2.5): catalogue → token-budget batches → encoder → store.
//!
//! A producer thread re-reads and tokenises the next window of items (in parallel) and plans its batches
//! while the encoder works on the current batch; the consumer writes each finished batch to the store and
//! journals it. Batch keys are (window, batch) pairs from a deterministic plan, so a rerun after a kill
//! skips exactly the batches already on disk.
//!
//! With several encoders (one per GPU, `--device cuda:0,1,…`) each gets a consumer thread; they pull from
//! the one channel and write through the one store writer, in whatever order their batches finish (rows
//! are addressed by index, so order does not matter). Encoders may queue a batch and hand back an earlier
//! one ([`ContentEncoder::submit`]); the consumer keeps the keys of its queued batches in order.

use super::batching;
use super::encoder::ContentEncoder;
use super::items::Catalogue;
use super::store::{JobKey, Opened, StoreWriter, shard_rows};
use super::text::TextRecipe;
use crate::npy::Dtype;
use crate::tokenizer::TextTokenizer;
use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde_json::json;
use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

/// What the job needs besides the encoder.
pub struct EmbedPlan<'a> {
    pub catalogue: &'a Catalogue,
    pub recipe: &'a TextRecipe,
    pub template_source: Option<String>,
    pub tokenizer: &'a TextTokenizer,
    pub out: PathBuf,
    pub dtype: Dtype,
    pub batch_tokens: usize,
    pub sort_window: usize,
    pub shard: Option<(usize, usize)>,
    pub overwrite: bool,
    pub model: String,
    pub model_fingerprint: String,
    pub quiet: bool,
}

/// Figures of a finished (or already complete) job.
#[derive(Debug, Default)]
pub struct EmbedReport {
    pub items: usize,
    pub tokens: usize,
    pub resumed_batches: usize,
    pub computed_items: usize,
    pub computed_tokens: usize,
    pub skipped_items: usize,
    pub seconds: f64,
    pub already_complete: bool,
}

/// One batch ready for the encoder.
struct Prepared {
    key: u64,
    rows: Vec<usize>,
    ids: Vec<Vec<u32>>,
}

enum Message {
    Batch(Prepared),
    /// A batch an earlier run already wrote: only counted.
    Skipped {
        items: usize,
    },
    Tokens(usize),
}

/// The key of batch `batch` of window `window`.
fn batch_key(window: usize, batch: usize) -> u64 {
    ((window as u64) << 32) | batch as u64
}

impl EmbedPlan<'_> {
    fn job_key(&self, dim: usize) -> JobKey {
        JobKey {
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            items: self.catalogue.path.display().to_string(),
            items_count: self.catalogue.len(),
            ids_digest: super::store::ids_digest(&self.catalogue.ids),
            model: self.model.clone(),
            model_fingerprint: self.model_fingerprint.clone(),
            dim,
            dtype: self.dtype.name().to_string(),
            template: self.template_source.clone(),
            max_tokens: self.tokenizer.max_tokens(),
            batch_tokens: self.batch_tokens,
            sort_window: self.sort_window,
            shard: self.shard,
        }
    }

    /// Catalogue rows this job embeds, in store-row order.
    fn rows(&self) -> Vec<usize> {
        match self.shard {
            Some((index, count)) => shard_rows(self.catalogue.len(), index, count).collect(),
            None => (0..self.catalogue.len()).collect(),
        }
    }

    /// Runs the job to completion with `encoder`, on the calling thread.
    pub fn run(&self, encoder: &mut dyn ContentEncoder) -> Result<EmbedReport> {
        let (dim, device) = (encoder.dim(), encoder.describe());
        self.run_with(dim, &device, |shared| consume(shared, encoder))
    }

    /// Runs the job with several encoders at once (one per GPU), each on its own thread.
    pub fn run_parallel(&self, encoders: &mut [Box<dyn ContentEncoder + Send + '_>]) -> Result<EmbedReport> {
        let Some(first) = encoders.first() else { anyhow::bail!("internal: no encoder") };
        let dim = first.dim();
        anyhow::ensure!(encoders.iter().all(|e| e.dim() == dim), "internal: encoders of different widths");
        let device = encoders.iter().map(|e| e.describe()).collect::<Vec<_>>().join("; ");
        self.run_with(dim, &device, |shared| {
            std::thread::scope(|scope| {
                let threads: Vec<_> =
                    encoders.iter_mut().map(|e| scope.spawn(move || consume(shared, e.as_mut()))).collect();
                let mut first_error = None;
                for thread in threads {
                    let result = thread.join().unwrap_or_else(|_| Err(anyhow::anyhow!("an encoder thread panicked")));
                    if let (Err(err), None) = (result, &first_error) {
                        first_error = Some(err);
                    }
                }
                first_error.map_or(Ok(()), Err)
            })
        })
    }

    fn run_with(&self, dim: usize, device: &str, consumers: impl FnOnce(&Shared) -> Result<()>) -> Result<EmbedReport> {
        let started = Instant::now();
        let key = self.job_key(dim);
        let rows = self.rows();
        let ids: Vec<String> = rows.iter().map(|&r| self.catalogue.ids[r].clone()).collect();
        let (writer, resumed) = match StoreWriter::open(&self.out, &key, &ids, self.dtype, self.overwrite)? {
            Opened::AlreadyComplete => return Ok(EmbedReport { already_complete: true, ..Default::default() }),
            Opened::Writing { writer, done } => (writer, done),
        };
        let done = writer.done_keys();
        let (tx, rx) = sync_channel::<Result<Message>>(4);
        let shared = Shared {
            rx: Mutex::new(Some(rx)),
            writer: Mutex::new(writer),
            report: Mutex::new(EmbedReport { items: rows.len(), resumed_batches: resumed, ..Default::default() }),
            progress: self.progress_bar(rows.len()),
            started,
            stop: AtomicBool::new(false),
        };
        let (rows_ref, done_ref) = (&rows, &done);
        std::thread::scope(|scope| {
            scope.spawn(move || self.produce(rows_ref, done_ref, tx));
            let result = consumers(&shared);
            // Dropping the receiver lets a producer blocked on a full channel see the hang-up and stop.
            drop(shared.rx.lock().map(|mut rx| rx.take()));
            result
        })?;
        let Shared { writer, report, progress, .. } = shared;
        progress.finish_and_clear();
        let mut report = report.into_inner().map_err(|_| anyhow::anyhow!("a consumer panicked"))?;
        let written = report.computed_items + report.skipped_items;
        anyhow::ensure!(written == rows.len(), "internal: {written} of {} rows were written", rows.len());
        let writer = writer.into_inner().map_err(|_| anyhow::anyhow!("a consumer panicked"))?;
        writer.finish(&self.meta(dim, device, &report))?;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    fn meta(&self, dim: usize, device: &str, report: &EmbedReport) -> serde_json::Value {
        json!({
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "dim": dim,
            "dtype": self.dtype.name(),
            "pooling": "mean",
            "normalized": true,
            "template": self.recipe.describe(self.template_source.as_deref()),
            "max_tokens": self.tokenizer.max_tokens(),
            "count": report.items,
            "total_tokens": report.tokens,
            "shard": self.shard.map(|(i, n)| format!("{i}/{n}")),
            "items": self.catalogue.path.display().to_string(),
            "skipped_invalid": self.catalogue.skipped,
            "device": device,
            "tool": "learn-kern",
            "tool_version": env!("CARGO_PKG_VERSION"),
        })
    }

    fn progress_bar(&self, total: usize) -> ProgressBar {
        if self.quiet {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} items · {per_sec} · {msg} · ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    }

    /// Tokenises window after window, plans batches and sends those not yet on disk.
    fn produce(&self, rows: &[usize], done: &HashSet<u64>, tx: SyncSender<Result<Message>>) {
        let result = (|| -> Result<()> {
            for (window, chunk) in rows.chunks(self.sort_window.max(1)).enumerate() {
                let texts = self.catalogue.texts(chunk, self.recipe)?;
                let tokens: Vec<Vec<u32>> =
                    texts.par_iter().map(|t| self.tokenizer.encode(t)).collect::<Result<_>>()?;
                let lengths: Vec<usize> = tokens.iter().map(Vec::len).collect();
                let _ = tx.send(Ok(Message::Tokens(lengths.iter().sum())));
                let mut tokens: Vec<Option<Vec<u32>>> = tokens.into_iter().map(Some).collect();
                for (b, batch) in batching::plan(&lengths, self.batch_tokens).into_iter().enumerate() {
                    let key = batch_key(window, b);
                    let message = if done.contains(&key) {
                        Message::Skipped { items: batch.len() }
                    } else {
                        let base = window * self.sort_window.max(1);
                        Message::Batch(Prepared {
                            key,
                            rows: batch.iter().map(|&i| base + i).collect(),
                            ids: batch.iter().map(|&i| tokens[i].take().unwrap_or_default()).collect(),
                        })
                    };
                    if tx.send(Ok(message)).is_err() {
                        return Ok(()); // the consumer stopped (it failed): nothing more to do
                    }
                }
            }
            Ok(())
        })();
        if let Err(err) = result {
            let _ = tx.send(Err(err));
        }
    }
}

/// Parses `--shard I/N`.
pub fn parse_shard(text: &str) -> Result<(usize, usize)> {
    let parsed = text.split_once('/').and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
    match parsed {
        Some((i, n)) if n > 0 && i < n => Ok((i, n)),
        _ => Err(crate::error::input(format!("--shard {text:?}: expected I/N with 0 ≤ I < N, e.g. 0/4"))),
    }
}

/// What the consumers share: the channel's receiving end, the store writer, the running report.
struct Shared {
    /// Taken (dropped) once every consumer has returned.
    rx: Mutex<Option<Receiver<Result<Message>>>>,
    writer: Mutex<StoreWriter>,
    report: Mutex<EmbedReport>,
    progress: ProgressBar,
    started: Instant,
    /// Set by a consumer that failed: the others stop taking batches.
    stop: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    mutex.lock().map_err(|_| anyhow::anyhow!("another embed consumer panicked"))
}

/// A batch handed to the encoder and not yet written: its key, its rows, its token count.
struct Queued {
    key: u64,
    rows: Vec<usize>,
    tokens: usize,
}

/// Encodes and writes batches until the producer is done or another consumer failed; returns the first
/// failure (after telling the others to stop).
fn consume(shared: &Shared, encoder: &mut dyn ContentEncoder) -> Result<()> {
    let result = consume_batches(shared, encoder);
    if result.is_err() {
        shared.stop.store(true, Ordering::Relaxed);
    }
    result
}

fn consume_batches(shared: &Shared, encoder: &mut dyn ContentEncoder) -> Result<()> {
    let mut queued: VecDeque<Queued> = VecDeque::new();
    let mut values = Vec::new();
    while !shared.stop.load(Ordering::Relaxed) {
        // Waiting for a batch holds the receiver: the other consumers would be waiting for one too.
        let message = match lock(&shared.rx)?.as_ref() {
            Some(rx) => rx.recv(),
            None => break,
        };
        let Ok(message) = message else { break };
        match message? {
            Message::Tokens(n) => lock(&shared.report)?.tokens += n,
            Message::Skipped { items } => {
                lock(&shared.report)?.skipped_items += items;
                shared.progress.inc(items as u64);
            }
            Message::Batch(batch) => {
                let seqs: Vec<&[u32]> = batch.ids.iter().map(Vec::as_slice).collect();
                let tokens = seqs.iter().map(|s| s.len()).sum();
                queued.push_back(Queued { key: batch.key, rows: batch.rows, tokens });
                if encoder.submit(&seqs, &mut values)? {
                    write(shared, &mut queued, &values)?;
                }
            }
        }
    }
    // Batches still in the encoder are finished and written, whether the producer ended or another
    // consumer failed: what is computed is kept for a resumed run.
    while encoder.flush(&mut values)? {
        write(shared, &mut queued, &values)?;
    }
    Ok(())
}

/// Writes the oldest queued batch, whose embeddings are `values`.
fn write(shared: &Shared, queued: &mut VecDeque<Queued>, values: &[f32]) -> Result<()> {
    let batch = queued.pop_front().ok_or_else(|| anyhow::anyhow!("internal: the encoder returned an unknown batch"))?;
    lock(&shared.writer)?.write_batch(batch.key, &batch.rows, values)?;
    let mut report = lock(&shared.report)?;
    report.computed_items += batch.rows.len();
    report.computed_tokens += batch.tokens;
    shared.progress.inc(batch.rows.len() as u64);
    let rate = report.computed_tokens as f64 / shared.started.elapsed().as_secs_f64().max(1e-9);
    shared.progress.set_message(format!("{rate:.0} tokens/s"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::store::ContentStore;
    use std::io::Write;

    /// A stand-in for the LLM: a deterministic function of each sequence's ids, failing after a number of
    /// batches to imitate a killed run.
    struct FakeEncoder {
        dim: usize,
        fail_after: Option<usize>,
        batches: usize,
    }

    impl ContentEncoder for FakeEncoder {
        fn dim(&self) -> usize {
            self.dim
        }
        fn encode(&mut self, seqs: &[&[u32]]) -> Result<Vec<f32>> {
            if self.fail_after == Some(self.batches) {
                anyhow::bail!("killed");
            }
            self.batches += 1;
            let dim = self.dim;
            let value = |s: &[u32], j: usize| {
                s.iter().map(|&t| ((t as usize * 31 + j) % 17) as f32).sum::<f32>() / s.len() as f32
            };
            Ok(seqs.iter().flat_map(|s| (0..dim).map(move |j| value(s, j))).collect())
        }
        fn describe(&self) -> String {
            "fake".into()
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        catalogue: Catalogue,
        tokenizer: TextTokenizer,
    }

    fn fixture(items: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let generated = crate::demo::catalogue::generate(items, 3);
        let mut file = std::fs::File::create(root.join("items.jsonl")).unwrap();
        for item in &generated {
            writeln!(file, "{}", item.record).unwrap();
        }
        let corpus: Vec<String> =
            generated.iter().map(|i| TextRecipe::Default.render(i.record.as_object().unwrap())).collect();
        let json = crate::init_model::tokenizer::build_tokenizer_json(&corpus, 400).unwrap();
        let tokenizer = TextTokenizer::new(tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap(), 24).unwrap();
        let catalogue = Catalogue::scan(&root.join("items.jsonl"), &TextRecipe::Default, false).unwrap();
        Fixture { _dir: dir, root, catalogue, tokenizer }
    }

    fn plan<'a>(f: &'a Fixture, out: &str, shard: Option<(usize, usize)>) -> EmbedPlan<'a> {
        EmbedPlan {
            catalogue: &f.catalogue,
            recipe: &TextRecipe::Default,
            template_source: None,
            tokenizer: &f.tokenizer,
            out: f.root.join(out),
            dtype: Dtype::F32,
            batch_tokens: 64,
            sort_window: 50,
            shard,
            overwrite: false,
            model: "fake".into(),
            model_fingerprint: "0".into(),
            quiet: true,
        }
    }

    fn rows(store: &ContentStore) -> Vec<Vec<f32>> {
        (0..store.len()).map(|r| store.row(r)).collect()
    }

    #[test]
    fn an_interrupted_job_resumes_to_the_same_store_as_an_uninterrupted_one() {
        let f = fixture(130);
        let whole = plan(&f, "whole", None).run(&mut FakeEncoder { dim: 3, fail_after: None, batches: 0 }).unwrap();
        assert_eq!(whole.computed_items, 130);
        assert!(whole.tokens > 130);

        let interrupted = plan(&f, "resumed", None);
        let err = interrupted.run(&mut FakeEncoder { dim: 3, fail_after: Some(5), batches: 0 }).unwrap_err();
        assert!(err.to_string().contains("killed"));
        assert!(!f.root.join("resumed/meta.json").exists(), "an interrupted store must not look finished");
        let resumed = interrupted.run(&mut FakeEncoder { dim: 3, fail_after: None, batches: 0 }).unwrap();
        assert_eq!(resumed.resumed_batches, 5);
        assert!(resumed.computed_items < 130 && resumed.computed_items + resumed.skipped_items == 130);

        let a = ContentStore::open(&f.root.join("whole")).unwrap();
        let b = ContentStore::open(&f.root.join("resumed")).unwrap();
        assert_eq!(a.ids, f.catalogue.ids);
        assert_eq!(rows(&a), rows(&b));
        assert_eq!(
            std::fs::read(f.root.join("whole/embeddings.npy")).unwrap(),
            std::fs::read(f.root.join("resumed/embeddings.npy")).unwrap()
        );
        // Row r holds item r: recompute one row directly.
        let text = f.catalogue.texts(&[77], &TextRecipe::Default).unwrap();
        let ids = f.tokenizer.encode(&text[0]).unwrap();
        let want = FakeEncoder { dim: 3, fail_after: None, batches: 0 }.encode(&[&ids]).unwrap();
        assert_eq!(a.row(77), want);

        let again = plan(&f, "whole", None).run(&mut FakeEncoder { dim: 3, fail_after: Some(0), batches: 0 }).unwrap();
        assert!(again.already_complete, "a finished store is not recomputed");
    }

    #[test]
    fn shards_hold_their_rows_in_order() {
        let f = fixture(40);
        plan(&f, "all", None).run(&mut FakeEncoder { dim: 2, fail_after: None, batches: 0 }).unwrap();
        plan(&f, "s1", Some((1, 3))).run(&mut FakeEncoder { dim: 2, fail_after: None, batches: 0 }).unwrap();
        let all = ContentStore::open(&f.root.join("all")).unwrap();
        let ids = std::fs::read_to_string(f.root.join("s1/ids.txt")).unwrap();
        let ids: Vec<&str> = ids.lines().collect();
        assert_eq!(ids.len(), 13);
        let shard = crate::npy::NpyMatrix::open(&f.root.join("s1/embeddings.npy")).unwrap();
        for (local, id) in ids.iter().enumerate() {
            let global = 1 + 3 * local;
            assert_eq!(*id, all.ids[global]);
            assert_eq!(shard.row(local), all.row(global));
        }
    }

    /// Hands each batch back only after `depth` more were queued, as the GPU encoder does (depth 1).
    struct LaggingEncoder {
        inner: FakeEncoder,
        depth: usize,
        queue: VecDeque<Vec<f32>>,
    }

    impl ContentEncoder for LaggingEncoder {
        fn dim(&self) -> usize {
            self.inner.dim
        }
        fn encode(&mut self, seqs: &[&[u32]]) -> Result<Vec<f32>> {
            self.inner.encode(seqs)
        }
        fn describe(&self) -> String {
            "lagging".into()
        }
        fn submit(&mut self, seqs: &[&[u32]], done: &mut Vec<f32>) -> Result<bool> {
            let values = self.inner.encode(seqs)?;
            self.queue.push_back(values);
            if self.queue.len() > self.depth {
                *done = self.queue.pop_front().unwrap();
                return Ok(true);
            }
            Ok(false)
        }
        fn flush(&mut self, done: &mut Vec<f32>) -> Result<bool> {
            match self.queue.pop_front() {
                Some(values) => {
                    *done = values;
                    Ok(true)
                }
                None => Ok(false),
            }
        }
    }

    fn npy(f: &Fixture, out: &str) -> Vec<u8> {
        std::fs::read(f.root.join(out).join("embeddings.npy")).unwrap()
    }

    #[test]
    fn queued_batches_and_several_encoders_write_the_same_store() {
        let f = fixture(150);
        let fake = |fail_after| FakeEncoder { dim: 4, fail_after, batches: 0 };
        plan(&f, "plain", None).run(&mut fake(None)).unwrap();
        for depth in [1, 3] {
            let out = format!("lagging{depth}");
            let report = plan(&f, &out, None)
                .run(&mut LaggingEncoder { inner: fake(None), depth, queue: VecDeque::new() })
                .unwrap();
            assert_eq!(report.computed_items, 150);
            assert_eq!(npy(&f, &out), npy(&f, "plain"), "depth {depth}");
        }
        let mut encoders: Vec<Box<dyn ContentEncoder + Send>> = vec![
            Box::new(fake(None)),
            Box::new(LaggingEncoder { inner: fake(None), depth: 1, queue: VecDeque::new() }),
            Box::new(fake(None)),
        ];
        let report = plan(&f, "parallel", None).run_parallel(&mut encoders).unwrap();
        assert_eq!((report.computed_items, report.skipped_items), (150, 0));
        assert_eq!(npy(&f, "parallel"), npy(&f, "plain"));
        let meta = std::fs::read_to_string(f.root.join("parallel/meta.json")).unwrap();
        assert!(meta.contains("fake; lagging; fake"), "{meta}");
    }

    #[test]
    fn a_failing_encoder_stops_the_others_and_the_store_resumes() {
        let f = fixture(150);
        let fake = |fail_after| FakeEncoder { dim: 4, fail_after, batches: 0 };
        plan(&f, "plain", None).run(&mut fake(None)).unwrap();
        let mut encoders: Vec<Box<dyn ContentEncoder + Send>> = vec![
            Box::new(LaggingEncoder { inner: fake(None), depth: 1, queue: VecDeque::new() }),
            Box::new(fake(Some(2))),
        ];
        let err = plan(&f, "resumed", None).run_parallel(&mut encoders).unwrap_err();
        assert!(err.to_string().contains("killed"), "{err}");
        assert!(!f.root.join("resumed/meta.json").exists());
        let resumed = plan(&f, "resumed", None).run(&mut fake(None)).unwrap();
        assert!(resumed.resumed_batches >= 2, "batches written before the failure are kept");
        assert_eq!(npy(&f, "resumed"), npy(&f, "plain"));
    }

    #[test]
    fn shard_arguments_are_checked() {
        assert_eq!(parse_shard("2/4").unwrap(), (2, 4));
        for bad in ["4/4", "1", "a/b", "0/0"] {
            assert!(crate::error::is_input_error(&parse_shard(bad).unwrap_err()), "{bad}");
        }
    }
}
