//! `eval` and `infer` on the GPU against the CPU path: the towers' embeddings (cosine ≥ 0.999 each, SPEC §6)
//! with passes small enough that users and items take many of them; the GPU eval's metrics equal to the
//! CPU's ranking of the same embeddings (the top-K kernel and the plumbing are exact), and to the CPU path's
//! up to the users whose ranking the towers' fp16 rounding reorders (counted and printed); and the CLI:
//! `eval`/`infer --device cuda` beside `--device cpu`, and a model the GPU tower lacks (heads of 16)
//! refused by `--device cuda` and run on the CPU by `--device auto`. Without a GPU each test says why and
//! skips.

mod cuda_support;

use cuda_support::{binary, cosine, gpu, rng};
use learn_kern::cuda::towers::{GpuTowers, arena_bytes_per_row};
use learn_kern::data::sequences::UserSequence;
use learn_kern::embed::store::{ContentStore, EMBEDDINGS, IDS, META};
use learn_kern::eval::gpu::GpuRanker;
use learn_kern::eval::run::{EvalOptions, EvalReport, Ranker, evaluate, evaluate_with};
use learn_kern::eval::topk::{Hit, top_k_block};
use learn_kern::eval::towers::{item_embeddings, user_embeddings};
use learn_kern::npy::{Dtype, NpyMatrixMut};
use learn_kern::pch::{PchConfig, PchParams};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

const MIN_COSINE: f64 = 0.999;
const HISTORY: usize = 30;

/// Heads of 64 (the GPU attention's size), widths multiples of 8.
fn config() -> PchConfig {
    PchConfig { d_content: 96, d_model: 128, n_layers: 2, n_heads: 2, d_ff: 256, d_out: 64, ..PchConfig::base() }
}

/// BERT's initialisation plus noise, so that outputs differ clearly between items and users.
fn random_params(cfg: &PchConfig, rng: &mut ChaCha8Rng) -> PchParams<f32> {
    let mut p = PchParams::init(cfg, rng.random()).unwrap();
    p.flat_mut().iter_mut().for_each(|v| *v += rng.random_range(-0.15..0.15));
    p
}

/// A store of `n` items `i0 …` with random content in [-1, 1).
fn write_store(dir: &Path, n: usize, dc: usize, rng: &mut ChaCha8Rng) -> ContentStore {
    std::fs::create_dir_all(dir).unwrap();
    let mut matrix = NpyMatrixMut::create(&dir.join(EMBEDDINGS), n, dc, Dtype::F32).unwrap();
    for r in 0..n {
        let row: Vec<f32> = (0..dc).map(|_| rng.random_range(-1.0..1.0)).collect();
        matrix.write_row(r, &row);
    }
    matrix.flush().unwrap();
    let ids: String = (0..n).map(|r| format!("i{r}\n")).collect();
    std::fs::write(dir.join(IDS), ids).unwrap();
    std::fs::write(dir.join(META), "{}").unwrap();
    ContentStore::open(dir).unwrap()
}

/// Users with 1..=40 history items (longer than HISTORY for some) and 1..=8 targets.
fn random_users(n: usize, items: usize, rng: &mut ChaCha8Rng) -> Vec<UserSequence> {
    (0..n)
        .map(|u| UserSequence {
            user: format!("u{u}"),
            line: u + 1,
            history: (0..rng.random_range(1..=40)).map(|_| rng.random_range(0..items as u32)).collect(),
            targets: (0..rng.random_range(1..=8)).map(|_| rng.random_range(0..items as u32)).collect(),
        })
        .collect()
}

fn assert_rows_agree(gpu: &[f32], cpu: &[f32], d: usize, what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: length");
    let worst = gpu.chunks(d).zip(cpu.chunks(d)).map(|(g, c)| cosine(g, c)).fold(1.0f64, f64::min);
    assert!(worst >= MIN_COSINE, "{what}: worst cosine {worst}");
    eprintln!("{what}: {} rows, worst cosine {worst:.6}", gpu.len() / d);
}

/// Ranks precomputed user embeddings (in the order eval passes users) with the CPU top-K.
struct HostRanker<'a> {
    users: &'a [f32],
    gallery: &'a [f32],
    d: usize,
    next: usize,
    block: usize,
}

impl Ranker for HostRanker<'_> {
    fn users_per_block(&self) -> usize {
        self.block
    }

    fn rank(&mut self, users: &[&UserSequence], k: usize, exclude: &[&[usize]]) -> anyhow::Result<Vec<Vec<Hit<f32>>>> {
        let (start, d) = (self.next, self.d);
        self.next += users.len();
        Ok(top_k_block(&self.users[start * d..self.next * d], self.gallery, d, k, exclude))
    }
}

fn metrics_differ(a: &EvalReport, b: &EvalReport) -> f64 {
    assert_eq!((a.users, a.gallery), (b.users, b.gallery));
    let pairs = a.model.iter().zip(&b.model).chain(a.popular.iter().flatten().zip(b.popular.iter().flatten()));
    pairs
        .map(|((ka, va), (kb, vb))| {
            assert_eq!(ka, kb);
            (va - vb).abs()
        })
        .fold(0.0, f64::max)
}

#[test]
fn eval_on_the_gpu_matches_the_cpu_path() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("eval on the GPU");
    let cfg = config();
    let params = random_params(&cfg, &mut rng);
    let dir = tempfile::tempdir().unwrap();
    let store = write_store(&dir.path().join("store"), 700, cfg.d_content, &mut rng);
    let users = random_users(300, store.len(), &mut rng);
    // Every third item is left out of the gallery: targets outside it count as absent.
    let gallery: Vec<u32> = (0..store.len() as u32).filter(|r| r % 3 != 0).collect();
    let counts: Vec<u64> = (0..gallery.len()).map(|_| rng.random_range(0..20)).collect();
    let options = EvalOptions {
        history: HISTORY,
        ks: vec![1, 10, 50],
        keep_history: false,
        gallery: gallery.clone(),
        popularity: Some(counts),
    };
    let d = cfg.d_out;

    // The CPU path.
    let cpu = evaluate(&params, &store, &users, &options).unwrap();
    let refs: Vec<&UserSequence> = users.iter().collect();
    let cpu_items = item_embeddings(&params, &store, &gallery).unwrap();
    let cpu_users = user_embeddings(&params, &store, &refs, HISTORY).unwrap();

    // The GPU path, with passes of about 160 positions: items in several passes, users a few at a time.
    let budget = 160 * (arena_bytes_per_row(&cfg) + 2 * cfg.d_content);
    let mut towers = GpuTowers::new(&gpu, &params, budget, HISTORY).unwrap();
    assert!(towers.rows_per_pass() < gallery.len() / 2, "{} rows a pass", towers.rows_per_pass());
    let (gpu_report, gpu_items) = {
        let mut ranker = GpuRanker::new(&gpu, &mut towers, &store, &gallery, HISTORY).unwrap();
        let report = evaluate_with(&mut ranker, store.len(), &users, &options).unwrap();
        (report, ranker.gallery_embeddings().unwrap())
    };
    // All 300 users are one ranking block, so this repeats the ranker's passes exactly.
    let gpu_users = towers.user_embeddings(&gpu, &store, &refs, HISTORY).unwrap();
    assert_rows_agree(&gpu_items, &cpu_items, d, "item tower");
    assert_rows_agree(&gpu_users, &cpu_users, d, "user tower");
    let host_items = towers.item_embeddings(&gpu, &store, &gallery).unwrap();
    assert_rows_agree(&host_items, &gpu_items, d, "item tower to the host and into the gallery");

    // The top-K kernel and the plumbing: the CPU ranking of the GPU's embeddings gives the same metrics.
    let mut host = HostRanker { users: &gpu_users, gallery: &gpu_items, d, next: 0, block: users.len() };
    let host_report = evaluate_with(&mut host, store.len(), &users, &options).unwrap();
    assert_eq!(gpu_report.model, host_report.model, "GPU top-K vs the CPU top-K of the same embeddings");
    assert_eq!(gpu_report.popular, host_report.popular);
    assert_eq!(gpu_report.popular, cpu.popular, "the popularity baseline does not depend on the device");

    // End to end: equal, but for users whose top 50 the towers' rounding reorders around a target.
    let views: Vec<Vec<usize>> = users
        .iter()
        .map(|u| {
            let mut e: Vec<usize> =
                u.history.iter().filter_map(|&r| gallery.binary_search(&r).ok()).collect::<Vec<_>>();
            e.sort_unstable();
            e.dedup();
            e
        })
        .collect();
    let excludes: Vec<&[usize]> = views.iter().map(|v| v.as_slice()).collect();
    let rows = |hits: Vec<Vec<Hit<f32>>>| -> Vec<Vec<usize>> {
        hits.into_iter().map(|h| h.into_iter().map(|h| h.row).collect()).collect()
    };
    let on_cpu = rows(top_k_block(&cpu_users, &cpu_items, d, 50, &excludes));
    let on_gpu = rows(top_k_block(&gpu_users, &gpu_items, d, 50, &excludes));
    let moved = users
        .iter()
        .zip(on_cpu.iter().zip(&on_gpu))
        .filter(|(u, (c, g))| {
            let targets: Vec<usize> = u.targets.iter().filter_map(|&r| gallery.binary_search(&r).ok()).collect();
            let at = |list: &Vec<usize>| -> Vec<Option<usize>> {
                targets.iter().map(|t| list.iter().position(|r| r == t)).collect()
            };
            at(c) != at(g)
        })
        .count();
    let diff = metrics_differ(&gpu_report, &cpu);
    eprintln!(
        "eval: {moved} of {} users have a target placed differently in the top 50; metrics differ by {diff:e}",
        users.len()
    );
    if moved == 0 {
        assert_eq!(gpu_report.model, cpu.model, "no user's targets moved, so the metrics must be equal");
    }
    // Each moved user shifts an average by at most 1 / users; the others leave it as it is.
    assert!(diff <= moved as f64 / users.len() as f64 + 1e-12, "metrics differ by {diff}, {moved} users moved");
}

/// The store kept on the device (`keep_content_on_device`) gives the host gather's embeddings bit for bit:
/// both read each row as fp16 the same way, and the device gather only moves it. The resident towers are a
/// second instance that never saw a host upload, so a gather that wrote nothing could not pass for one.
/// A pass over another store gathers that store on the host; a store over the budget stays on the host.
#[test]
fn content_kept_on_the_device_gives_the_host_gathers_results() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("content on the device");
    let cfg = config();
    let params = random_params(&cfg, &mut rng);
    let dir = tempfile::tempdir().unwrap();
    let store = write_store(&dir.path().join("store"), 500, cfg.d_content, &mut rng);
    let other = write_store(&dir.path().join("other"), 300, cfg.d_content, &mut rng);
    let users = random_users(120, store.len(), &mut rng);
    let refs: Vec<&UserSequence> = users.iter().collect();
    let items: Vec<u32> = (0..store.len() as u32).rev().step_by(3).collect();
    let budget = 160 * (arena_bytes_per_row(&cfg) + 2 * cfg.d_content);

    let mut on_host = GpuTowers::new(&gpu, &params, budget, HISTORY).unwrap();
    let host_users = on_host.user_embeddings(&gpu, &store, &refs, HISTORY).unwrap();
    let host_items = on_host.item_embeddings(&gpu, &store, &items).unwrap();
    let other_users = random_users(50, other.len(), &mut rng);
    let other_refs: Vec<&UserSequence> = other_users.iter().collect();
    let host_other = on_host.user_embeddings(&gpu, &other, &other_refs, HISTORY).unwrap();

    let mut resident = GpuTowers::new(&gpu, &params, budget, HISTORY).unwrap();
    let too_small = store.len() * cfg.d_content * 2 - 1;
    assert!(!resident.keep_content_on_device(&gpu, &store, too_small).unwrap(), "a store over the budget");
    assert!(resident.keep_content_on_device(&gpu, &store, usize::MAX).unwrap());
    let users_there = resident.user_embeddings(&gpu, &store, &refs, HISTORY).unwrap();
    let items_there = resident.item_embeddings(&gpu, &store, &items).unwrap();
    assert!(users_there.iter().all(|v| v.is_finite()), "non-finite user embeddings");
    assert_eq!(users_there, host_users, "user tower: device gather against host gather");
    assert_eq!(items_there, host_items, "item tower: device gather against host gather");
    let other_there = resident.user_embeddings(&gpu, &other, &other_refs, HISTORY).unwrap();
    assert_eq!(other_there, host_other, "another store must be gathered on the host, not from the resident one");
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(binary()).args(args).env_remove("RUST_BACKTRACE").output().unwrap()
}

fn succeed(args: &[&str]) -> std::process::Output {
    let out = run(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn write_sequences(path: &Path, users: &[UserSequence]) {
    let text: String = users
        .iter()
        .map(|u| {
            let ids = |rows: &[u32]| rows.iter().map(|r| format!("\"i{r}\"")).collect::<Vec<_>>().join(",");
            format!(
                "{{\"user\": \"{}\", \"history\": [{}], \"targets\": [{}]}}\n",
                u.user,
                ids(&u.history),
                ids(&u.targets)
            )
        })
        .collect();
    std::fs::write(path, text).unwrap();
}

#[test]
fn eval_and_infer_on_the_cli() {
    let Some(gpu) = gpu() else { return };
    drop(gpu);
    let mut rng = rng("eval and infer on the CLI");
    let cfg = config();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let store = write_store(&root.join("store"), 400, cfg.d_content, &mut rng);
    let users = random_users(120, store.len(), &mut rng);
    let sequences = root.join("sequences.jsonl");
    write_sequences(&sequences, &users);
    let checkpoint = root.join("model.safetensors");
    learn_kern::train::checkpoint::save(&checkpoint, &random_params(&cfg, &mut rng), &[]).unwrap();
    let (ckpt, content, seqs) =
        (checkpoint.to_str().unwrap(), root.join("store"), sequences.to_str().unwrap().to_string());
    let content = content.to_str().unwrap();

    let eval_args = |k: &'static str, device: &'static str| {
        ["eval", "--checkpoint", ckpt, "--content", content, "--sequences", seqs.as_str(), "--k", k, "--device", device]
    };
    let eval = |device: &'static str| -> Value {
        let out = succeed(&[&eval_args("5,20", device)[..], &["--json", "-"]].concat());
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (on_gpu, on_cpu) = (eval("cuda"), eval("cpu"));
    assert_eq!(on_gpu["users"], on_cpu["users"]);
    assert_eq!(on_gpu["gallery"], on_cpu["gallery"]);
    for (name, value) in on_cpu["metrics"].as_object().unwrap() {
        let (c, g) = (value.as_f64().unwrap(), on_gpu["metrics"][name].as_f64().unwrap());
        assert!((c - g).abs() <= 0.05, "{name}: CPU {c}, GPU {g}");
    }
    eprintln!("eval --device cuda: {}\neval --device cpu:  {}", on_gpu["metrics"], on_cpu["metrics"]);
    // Past the kernel's K: the GPU towers, the CPU ranking.
    let out = succeed(&eval_args("300", "cuda"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--k above 256"), "{}", String::from_utf8_lossy(&out.stderr));

    for (tower, extra) in [("item", vec![]), ("user", vec!["--sequences", seqs.as_str(), "--history", "20"])] {
        let infer = |device: &str| -> ContentStore {
            let out_dir = root.join(format!("{tower}-{device}"));
            let mut args = vec![
                "infer",
                "--checkpoint",
                ckpt,
                "--content",
                content,
                "--tower",
                tower,
                "--device",
                device,
                "--quiet",
                "--out",
            ];
            let out_arg = out_dir.to_str().unwrap().to_string();
            args.push(&out_arg);
            args.extend(extra.iter().copied());
            succeed(&args);
            ContentStore::open(&out_dir).unwrap()
        };
        let (g, c) = (infer("cuda"), infer("cpu"));
        assert_eq!(g.ids, c.ids, "infer --tower {tower}: ids");
        let rows = |s: &ContentStore| (0..s.len()).flat_map(|r| s.row(r)).collect::<Vec<f32>>();
        assert_rows_agree(&rows(&g), &rows(&c), cfg.d_out, &format!("infer --tower {tower}"));
    }

    // A model the GPU tower does not implement (heads of 16): refused on cuda, run on the CPU under auto.
    let tiny = PchConfig { d_content: cfg.d_content, ..PchConfig::tiny() };
    let tiny_path = root.join("tiny.safetensors");
    learn_kern::train::checkpoint::save(&tiny_path, &PchParams::init(&tiny, 1).unwrap(), &[]).unwrap();
    let tiny_ckpt = tiny_path.to_str().unwrap();
    let args = |device: &'static str| {
        vec!["eval", "--checkpoint", tiny_ckpt, "--content", content, "--sequences", seqs.as_str(), "--device", device]
    };
    let refused = run(&args("cuda"));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--device cuda") && stderr.contains("heads of 64"), "{stderr}");
    let fallback = run(&args("auto"));
    let stderr = String::from_utf8_lossy(&fallback.stderr);
    assert!(fallback.status.success(), "{stderr}");
    assert!(stderr.contains("running on the CPU") && stderr.contains("heads of 64"), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.contains("running on the CPU")).count(), 1, "{stderr}");
}
