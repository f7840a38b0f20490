//! The loss, the optimiser and retrieval against values from PyTorch and numpy, made by
//! tools/golden/make_loss_fixtures.py and committed under tests/fixtures/loss.

use learn_kern::cpu::infonce::{InfoNceBatch, LossPositions, infonce};
use learn_kern::eval::metrics::MetricsAccumulator;
use learn_kern::eval::topk::{Popularity, top_k};
use learn_kern::train::optim::{Adam, AdamConfig, clip_grad_norm};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/loss/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture file")).expect("fixture JSON")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number")).collect()
}

fn ints(v: &Value) -> Vec<usize> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("integer") as usize).collect()
}

fn size(v: &Value, key: &str) -> usize {
    v[key].as_u64().expect("size") as usize
}

/// Runs the loss on a fixture case in `T`, returning (loss, pairs, d_users, d_items) in f64.
fn run_case<T: learn_kern::cpu::Real>(case: &Value) -> (f64, usize, Vec<f64>, Vec<f64>) {
    let cast = |v: Vec<f64>| v.into_iter().map(T::c).collect::<Vec<T>>();
    let (users, items) = (cast(floats(&case["users"])), cast(floats(&case["items"])));
    let ids: Vec<u32> = ints(&case["target_ids"]).into_iter().map(|x| x as u32).collect();
    let (hist_len, tgt_len) = (ints(&case["hist_len"]), ints(&case["tgt_len"]));
    let batch = InfoNceBatch {
        users: &users,
        hist_len: &hist_len,
        items: &items,
        tgt_len: &tgt_len,
        target_ids: &ids,
        h: size(case, "h"),
        t: size(case, "t"),
        d: size(case, "d"),
        tau: T::c(case["tau"].as_f64().expect("tau")),
        keep_false_negatives: case["keep_false_negatives"].as_bool().expect("keep"),
        positions: if case["positions"] == "last" { LossPositions::Last } else { LossPositions::All },
        log_q: None,
    };
    let mut du = vec![T::nan(); users.len()];
    let mut di = vec![T::nan(); items.len()];
    let out = infonce(&batch, &mut du, &mut di);
    let back = |v: Vec<T>| v.into_iter().map(|x| x.to_f64().expect("finite")).collect::<Vec<f64>>();
    (out.loss.to_f64().expect("loss"), out.pairs, back(du), back(di))
}

#[test]
fn infonce_matches_pytorch_autograd() {
    for case in fixture("infonce").as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let want_loss = case["loss"].as_f64().expect("loss");
        let (want_du, want_di) = (floats(&case["d_users"]), floats(&case["d_items"]));
        let scale = want_du.iter().chain(&want_di).fold(1e-30f64, |a, &x| a.max(x.abs()));

        let (loss, pairs, du, di) = run_case::<f64>(case);
        assert_eq!(pairs, size(case, "pairs"), "{name}");
        assert!((loss - want_loss).abs() <= 1e-10 * want_loss.abs().max(1.0), "{name}: {loss} vs {want_loss}");
        for (g, w) in du.iter().chain(&di).zip(want_du.iter().chain(&want_di)) {
            assert!((g - w).abs() <= 1e-10 * scale, "{name} gradient: {g} vs {w}");
        }

        let (loss, _, du, di) = run_case::<f32>(case);
        if want_loss == 0.0 {
            assert_eq!(loss, 0.0, "{name}");
        } else {
            assert!(((loss - want_loss) / want_loss).abs() <= 1e-5, "{name} f32: {loss} vs {want_loss}");
        }
        for (g, w) in du.iter().chain(&di).zip(want_du.iter().chain(&want_di)) {
            assert!((g - w).abs() <= 1e-4 * scale, "{name} f32 gradient: {g} vs {w}");
        }
    }
}

#[test]
fn adam_matches_pytorch() {
    for case in fixture("adam").as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let mut params: Vec<Vec<f32>> = case["init"]
            .as_array()
            .expect("init")
            .iter()
            .map(|p| floats(p).into_iter().map(|x| x as f32).collect())
            .collect();
        let sizes: Vec<usize> = params.iter().map(Vec::len).collect();
        let config = AdamConfig { weight_decay: case["weight_decay"].as_f64().expect("wd"), ..AdamConfig::default() };
        let mut adam = Adam::new(config, &sizes);
        for (s, step) in case["steps"].as_array().expect("steps").iter().enumerate() {
            let mut grads: Vec<Vec<f32>> = step["grads"]
                .as_array()
                .expect("grads")
                .iter()
                .map(|g| floats(g).into_iter().map(|x| x as f32).collect())
                .collect();
            if let Some(max_norm) = case["clip"].as_f64() {
                let norm =
                    clip_grad_norm(&mut grads.iter_mut().map(|g| g.as_mut_slice()).collect::<Vec<_>>(), max_norm);
                let want = step["grad_norm"].as_f64().expect("norm");
                assert!((norm - want).abs() <= 1e-6 * want, "{name} step {s}: norm {norm} vs {want}");
            }
            let mut views: Vec<&mut [f32]> = params.iter_mut().map(|p| p.as_mut_slice()).collect();
            adam.update(
                &mut views,
                &grads.iter().map(|g| g.as_slice()).collect::<Vec<_>>(),
                step["lr"].as_f64().expect("lr"),
            );
            // The moments are bit-exact where the gradients are (clipping uses an f64 norm, PyTorch an f32 one).
            if case["clip"].is_null() {
                for (key, state) in [("exp_avg", &adam.m), ("exp_avg_sq", &adam.v)] {
                    for (got, want) in state.iter().zip(step[key].as_array().expect("moments")) {
                        let want: Vec<f32> = floats(want).into_iter().map(|x| x as f32).collect();
                        assert_eq!(got, &want, "{name} step {s}: {key}");
                    }
                }
            }
            for (p, want) in params.iter().zip(step["params"].as_array().expect("params")) {
                for (&got, want) in p.iter().zip(floats(want)) {
                    // A few f32 ulps: PyTorch fuses its lerp into an FMA.
                    assert!(
                        (got as f64 - want).abs() <= 4.0 * f32::EPSILON as f64 * want.abs().max(1e-3),
                        "{name} step {s}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn retrieval_matches_numpy() {
    let fix = fixture("retrieval");
    let gallery = size(&fix, "gallery");
    let ks = ints(&fix["ks"]);
    let mut acc = MetricsAccumulator::new(&ks).expect("ks");
    for (u, user) in fix["users"].as_array().expect("users").iter().enumerate() {
        let scores: Vec<f32> = floats(&user["scores"]).into_iter().map(|x| x as f32).collect();
        let ranked: Vec<usize> = top_k(&scores, acc.max_k(), &ints(&user["exclude"])).iter().map(|h| h.row).collect();
        assert_eq!(ranked, ints(&user["ranked"]), "user {u}");
        // Targets past the gallery are absent: counted in |targets|, never retrievable.
        let mut targets = ints(&user["targets"]);
        targets.sort_unstable();
        targets.dedup();
        let absent = targets.iter().filter(|&&t| t >= gallery).count();
        targets.retain(|&t| t < gallery);
        acc.add(&ranked, &targets, absent);
    }
    for (name, value) in acc.averages() {
        let want = fix["metrics"][&name].as_f64().expect("metric");
        assert!((value - want).abs() < 1e-12, "{name}: {value} vs {want}");
    }

    let pop = &fix["popularity"];
    let counts: Vec<u64> = ints(&pop["counts"]).into_iter().map(|c| c as u64).collect();
    let ranked: Vec<usize> =
        Popularity::new(&counts).top_k(size(pop, "k"), &ints(&pop["exclude"])).iter().map(|h| h.row).collect();
    assert_eq!(ranked, ints(&pop["ranked"]));
}
