//! `learn-kern convert` against checkpoints written by `torch.save` (tools/convert/make_torch_fixtures.py):
//! every tensor must come out bit for bit as PyTorch's own `.contiguous()` copy, and every bad checkpoint must be
//! refused with a clear input error, without running anything.

use learn_kern::convert::{convert_hint, convert_model_dir, has_torch_weights};
use learn_kern::error::{is_input_error, one_line};
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/convert").join(name)
}

/// A scratch copy of a fixture directory, so outputs never land in the repository.
fn scratch(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// Every tensor of `expected` is in one of `files` with the same dtype, shape and bytes, and nothing else is.
fn assert_same_tensors(expected: &Path, files: &[PathBuf]) {
    let want_bytes = std::fs::read(expected).unwrap();
    let want = SafeTensors::deserialize(&want_bytes).unwrap();
    let got_bytes: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let mut count = 0;
    for (file, bytes) in files.iter().zip(&got_bytes) {
        let got = SafeTensors::deserialize(bytes).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for (name, t) in got.tensors() {
            let w = want.tensor(&name).unwrap_or_else(|_| panic!("{name} is not expected"));
            assert_eq!(t.dtype(), w.dtype(), "{name}");
            assert_eq!(t.shape(), w.shape(), "{name}");
            assert!(t.data() == w.data(), "{name}: data differs");
            count += 1;
        }
    }
    assert_eq!(count, want.len(), "tensor count");
}

fn no_temporaries(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        assert!(!name.contains(".tmp"), "left behind: {name}");
    }
}

#[test]
fn single_files_of_each_dtype_convert_exactly() {
    for name in ["single_f32", "single_f16", "single_bf16", "module", "protocol4"] {
        let dir = scratch(name);
        let report = convert_model_dir(dir.path(), None, false).unwrap();
        let out = dir.path().join("model.safetensors");
        assert_eq!(report.outputs, vec![out.clone()]);
        assert_same_tensors(&fixture(name).join("expected.safetensors"), &[out]);
        assert!(!dir.path().join("model.safetensors.index.json").exists());
        no_temporaries(dir.path());
        assert!(report.ignored.is_empty(), "{name}: {:?}", report.ignored);
    }
}

#[test]
fn the_report_counts_what_was_written() {
    let dir = scratch("single_bf16");
    let report = convert_model_dir(dir.path(), None, false).unwrap();
    assert_eq!(report.inputs, vec![dir.path().join("pytorch_model.bin")]);
    assert_eq!(report.tensors, 14);
    // The tied embedding and head are the largest, 7x5 bf16 each.
    assert_eq!(report.largest_bytes, 70);
    assert!(["lm_head.weight", "model.embed_tokens.weight"].contains(&report.largest_tensor.as_str()));
    // Tensor data: 7x5 twice, 6x4, 2x4, 4x4, 3x4, 3x5, 6x3, 4x2x3, 3x4, 4, 1, 0x3 and 6 elements of 2 bytes.
    let elements = 35 * 2 + 24 + 8 + 16 + 12 + 15 + 18 + 24 + 12 + 4 + 1 + 6;
    assert_eq!(report.bytes, elements * 2);
    let file = std::fs::metadata(dir.path().join("model.safetensors")).unwrap().len();
    assert!(file > report.bytes && file < report.bytes + 4096);
}

#[test]
fn shards_convert_to_mirrored_shards_and_an_index() {
    let dir = scratch("sharded");
    let out = tempfile::tempdir().unwrap();
    let report = convert_model_dir(dir.path(), Some(out.path()), false).unwrap();
    let shards: Vec<PathBuf> = (1..=3).map(|i| out.path().join(format!("model-{i:05}-of-00003.safetensors"))).collect();
    let mut outputs = shards.clone();
    outputs.push(out.path().join("model.safetensors.index.json"));
    assert_eq!(report.outputs, outputs);
    assert_same_tensors(&fixture("sharded").join("expected.safetensors"), &shards);

    // The index maps each tensor to the shard mirroring its input shard, with the total data size.
    let read_json = |p: PathBuf| -> serde_json::Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let index = read_json(out.path().join("model.safetensors.index.json"));
    let input = read_json(dir.path().join("pytorch_model.bin.index.json"));
    let input_map = input["weight_map"].as_object().unwrap();
    let output_map = index["weight_map"].as_object().unwrap();
    assert_eq!(output_map.len(), input_map.len());
    for (name, file) in input_map {
        let want = file.as_str().unwrap().replace("pytorch_model", "model").replace(".bin", ".safetensors");
        assert_eq!(output_map[name], want.as_str(), "{name}");
    }
    assert_eq!(index["metadata"]["total_size"], input["metadata"]["total_size"]);
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(report.bytes));
    for shard in &shards {
        let bytes = std::fs::read(shard).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, _) in st.tensors() {
            assert_eq!(output_map[&name], shard.file_name().unwrap().to_str().unwrap());
        }
    }
    no_temporaries(out.path());
}

#[test]
fn a_wrapped_training_checkpoint_is_unwrapped() {
    let dir = scratch("wrapped");
    let report = convert_model_dir(dir.path(), None, false).unwrap();
    assert_same_tensors(&fixture("wrapped").join("expected.safetensors"), &[dir.path().join("model.safetensors")]);
    let ignored: Vec<&str> = report.ignored.iter().map(|s| s.rsplit(": ").next().unwrap()).collect();
    assert_eq!(ignored, ["epoch", "best", "optimizer"]);
}

#[test]
fn converting_again_replaces_the_output() {
    let dir = scratch("single_f16");
    convert_model_dir(dir.path(), None, false).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), b"stale").unwrap();
    convert_model_dir(dir.path(), None, false).unwrap();
    assert_same_tensors(&fixture("single_f16").join("expected.safetensors"), &[dir.path().join("model.safetensors")]);
}

#[test]
fn torch_weights_are_detected_and_the_hint_names_the_command() {
    assert!(has_torch_weights(&fixture("single_f32")));
    assert!(has_torch_weights(&fixture("sharded")));
    let empty = tempfile::tempdir().unwrap();
    assert!(!has_torch_weights(empty.path()));
    let hint = convert_hint(Path::new("/models/baichuan2"));
    assert!(hint.contains("learn-kern convert --model /models/baichuan2"), "{hint}");
}

/// Converts `dir` and returns the one-line error, which must be bad input (exit status 2).
fn refused(dir: &Path) -> String {
    let err = convert_model_dir(dir, None, false).unwrap_err();
    assert!(is_input_error(&err), "not an input error: {err:#}");
    let msg = one_line(&err);
    assert!(!dir.join("model.safetensors").exists(), "output written despite: {msg}");
    no_temporaries(dir);
    msg
}

#[test]
fn hostile_pickles_are_refused_without_running_anything() {
    let marker = Path::new("/tmp/learn-kern-convert-pwned-marker");
    // Protocol 2 writes Python 3 names in their Python 2 spelling: os.system is posix.system, eval __builtin__.eval.
    for (name, global) in [("evil_system", "posix.system"), ("evil_eval", "__builtin__.eval")] {
        let _ = std::fs::remove_file(marker);
        let dir = scratch(name);
        let msg = refused(dir.path());
        assert!(msg.contains(&format!("refuses global `{global}`")), "{msg}");
        assert!(msg.contains("pytorch_model.bin: data.pkl byte"), "{msg}");
        assert!(!marker.exists(), "{name} ran");
    }
}

#[test]
fn damaged_checkpoints_get_clear_errors() {
    let cases = [
        ("legacy", "a legacy (torch < 1.6, non-zip) checkpoint"),
        ("missing_storage", "reads storage pytorch_model/data/1, which the archive does not hold"),
        ("short_storage", "storage data/1 holds 92 bytes, but tensor `shared.whole` declares it as 24 F32 elements"),
        ("corrupt_pickle", "data.pkl byte"),
        ("recompressed", "storage data/0 is compressed"),
        ("overrun", "tensor `bad` (offset 3, size [2], stride [1]) reaches past the 4 elements of storage data/0"),
    ];
    for (name, want) in cases {
        let dir = scratch(name);
        let msg = refused(dir.path());
        assert!(msg.contains("pytorch_model.bin: "), "{name}: {msg}");
        assert!(msg.contains(want), "{name}: {msg}");
    }
}

#[test]
fn truncated_and_bit_flipped_files_are_caught() {
    let good = std::fs::read(fixture("single_f32").join("pytorch_model.bin")).unwrap();
    for keep in [good.len() - 10, good.len() / 2, 100, 3] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pytorch_model.bin"), &good[..keep]).unwrap();
        let msg = refused(dir.path());
        assert!(msg.contains("pytorch_model.bin: not a"), "{keep}: {msg}");
    }

    let dir = tempfile::tempdir().unwrap();
    let pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 9948693272\n";
    std::fs::write(dir.path().join("pytorch_model.bin"), pointer).unwrap();
    assert!(refused(dir.path()).contains("a Git LFS pointer, not the weights"));

    // A flipped byte in the pickle or in a whole-storage tensor fails the archive's CRC.
    // Offsets from an entry's name in its local header: past the alignment padding (at most 67 bytes), inside
    // the data. Storage 0 is the 7x5 embedding, which tensors read whole.
    let pkl = good.windows(8).position(|w| w == b"data.pkl").unwrap();
    let storage = good.windows(6).position(|w| w == b"data/0").unwrap();
    for (what, at) in [("data.pkl is corrupt", pkl + 120), ("fails its CRC check", storage + 80)] {
        let mut bad = good.clone();
        bad[at] ^= 0x40;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pytorch_model.bin"), &bad).unwrap();
        let msg = refused(dir.path());
        assert!(msg.contains(what), "{what}: {msg}");
    }
}

#[test]
fn missing_or_inconsistent_shards_are_named() {
    let dir = scratch("sharded");
    std::fs::remove_file(dir.path().join("pytorch_model-00002-of-00003.bin")).unwrap();
    let msg = refused(dir.path());
    assert!(msg.contains("shard pytorch_model-00002-of-00003.bin"), "{msg}");
    assert!(msg.contains("is missing"), "{msg}");

    let dir = scratch("sharded");
    let index = dir.path().join("pytorch_model.bin.index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    std::fs::write(&index, text.replacen("\"model.norm.weight\"", "\"model.norm.bias\"", 1)).unwrap();
    let msg = refused(dir.path());
    assert!(msg.contains("lists tensor `model.norm.bias` in pytorch_model-00002-of-00003.bin"), "{msg}");

    std::fs::write(&index, "{\"weight_map\": [1, 2]}").unwrap();
    assert!(refused(dir.path()).contains("no \"weight_map\" object"));
    std::fs::write(&index, "{\"weight_map\": {\"a\": \"../x.bin\"}}").unwrap();
    assert!(refused(dir.path()).contains("not a plain file name"));

    let empty = tempfile::tempdir().unwrap();
    assert!(refused(empty.path()).contains("holds no pytorch_model.bin or pytorch_model.bin.index.json"));
}
