//! SentencePiece `tokenizer.model` support against `sentencepiece` itself.
//!
//! Fixtures (tools/sp/make_fixtures.py): six BPE models trained by `sentencepiece` with Baichuan2's trainer
//! settings and variants, and `cases.zip` with 10,000 strings and the ids `SentencePieceProcessor.encode`
//! gave for each string and model.

use learn_kern::error::{exit_status, one_line};
use learn_kern::sentencepiece::{SentencePiece, Specials, export_tokenizer_json};
use learn_kern::tokenizer::TextTokenizer;
use rayon::prelude::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const MODELS: [&str; 6] = ["small", "large", "large-ties", "defaults", "strip", "odd"];
/// The models whose settings `tokenizer.json` can express exactly; the other two are refused.
const EXPORTABLE: [&str; 4] = ["small", "large", "defaults", "strip"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sp").join(name)
}

struct Cases {
    strings: Vec<String>,
    ids: Vec<(String, Vec<Vec<u32>>)>,
}

impl Cases {
    fn ids(&self, model: &str) -> &[Vec<u32>] {
        &self.ids.iter().find(|(name, _)| name == model).expect("fixture ids for every model").1
    }
}

fn cases() -> &'static Cases {
    static CASES: OnceLock<Cases> = OnceLock::new();
    CASES.get_or_init(|| {
        let file = std::fs::File::open(fixture("cases.zip")).unwrap();
        let mut zip = zip::ZipArchive::new(file).unwrap();
        let mut read = |name: &str| {
            let mut text = String::new();
            zip.by_name(name).unwrap().read_to_string(&mut text).unwrap();
            text
        };
        let strings: Vec<String> = read("strings.jsonl").lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let ids = MODELS
            .iter()
            .map(|&m| {
                let rows: Vec<Vec<u32>> = read(&format!("ids/{m}.txt"))
                    .lines()
                    .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
                    .collect();
                assert_eq!(rows.len(), strings.len());
                (m.to_string(), rows)
            })
            .collect();
        Cases { strings, ids }
    })
}

/// Compares `encode` with the fixture ids of `model` on every string; panics listing the first mismatches.
fn assert_matches(model: &str, what: &str, encode: impl Fn(&str) -> Vec<u32> + Sync) {
    let cases = cases();
    let expected = cases.ids(model);
    let bad: Vec<usize> =
        (0..cases.strings.len()).into_par_iter().filter(|&i| encode(&cases.strings[i]) != expected[i]).collect();
    for &i in bad.iter().take(5) {
        eprintln!(
            "{model} ({what}): {:?}\n  expected {:?}\n  got      {:?}",
            cases.strings[i],
            expected[i],
            encode(&cases.strings[i])
        );
    }
    assert!(bad.is_empty(), "{model} ({what}): {} of {} strings differ", bad.len(), cases.strings.len());
}

#[test]
fn fixtures_cover_what_they_claim() {
    let cases = cases();
    let s = &cases.strings;
    assert!(s.len() >= 10_000);
    let any = |f: &dyn Fn(&str) -> bool| s.iter().filter(|t| f(t)).count();
    assert!(any(&|t| t.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c))) > 1000, "Chinese");
    assert!(any(&|t| t.contains("    ")) > 300, "runs of spaces");
    assert!(any(&|t| t.contains('\t')) > 300 && any(&|t| t.contains('\n')) > 300, "tabs and newlines");
    assert!(any(&|t| t.chars().any(|c| c as u32 > 0xffff)) > 300, "characters outside the BMP");
    assert!(any(&|t| t.contains("<s>")) > 50, "literal <s>");
    assert!(any(&|t| t.contains("def ") || t.contains("print(")) > 300, "code");
    assert!(any(&|t| t.chars().filter(char::is_ascii_digit).count() > 5) > 1000, "digits");
    assert!(any(&|t| t.chars().count() > 10_000) >= 4, "long texts");
    // The tie model really ties, and the ties change the output on some strings.
    let tied = cases.ids("large-ties");
    let untied = cases.ids("large");
    assert!(tied.iter().zip(untied).filter(|(a, b)| a != b).count() > 100);
}

#[test]
fn every_model_matches_sentencepiece_on_every_string() {
    for model in MODELS {
        let sp = SentencePiece::load(&fixture(&format!("{model}.model"))).unwrap();
        assert_matches(model, "SentencePiece::encode", |text| sp.encode(text).unwrap());
    }
}

/// A model directory holding a copy of a fixture model as `tokenizer.model`, and optionally a config.
fn model_dir(model: &str, config: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture(&format!("{model}.model")), dir.path().join("tokenizer.model")).unwrap();
    if let Some(config) = config {
        std::fs::write(dir.path().join("tokenizer_config.json"), config).unwrap();
    }
    dir
}

#[test]
fn text_tokenizer_uses_tokenizer_model_when_there_is_no_tokenizer_json() {
    // Baichuan2's config: no BOS / EOS.
    let dir = model_dir("small", Some(r#"{"add_bos_token": false, "add_eos_token": false, "model_max_length": 4096}"#));
    let tok = TextTokenizer::load(dir.path(), 1 << 20).unwrap();
    assert_eq!(tok.vocab_size(), 1500);
    assert_eq!(tok.max_tokens(), 1 << 20);
    assert_matches("small", "TextTokenizer", |text| tok.encode(text).unwrap());
}

#[test]
fn bos_eos_and_truncation_follow_tokenizer_config_like_hugging_face() {
    let dir = model_dir("small", Some(r#"{"add_bos_token": true, "add_eos_token": true}"#));
    let sp = SentencePiece::load(&dir.path().join("tokenizer.model")).unwrap();
    let (bos, eos) = (sp.bos_id().unwrap(), sp.eos_id().unwrap());
    assert_eq!((sp.piece(bos), sp.piece(eos)), (Some("<s>"), Some("</s>")));
    assert_eq!(sp.specials(dir.path()).unwrap(), Specials { bos: Some(bos), eos: Some(eos) });

    let full = TextTokenizer::load(dir.path(), 1 << 20).unwrap();
    let cut = TextTokenizer::load(dir.path(), 8).unwrap();
    // The same folder's exported tokenizer.json, run by the `tokenizers` library with its own truncation.
    let json_path = dir.path().join("exported.json");
    std::fs::write(&json_path, export_tokenizer_json(dir.path()).unwrap()).unwrap();
    let hf_cut = TextTokenizer::from_file(&json_path, 8).unwrap();

    let cases = cases();
    let expected = cases.ids("small");
    let mut truncated = 0;
    for (text, ids) in cases.strings.iter().zip(expected) {
        let want: Vec<u32> = [vec![bos], ids.clone(), vec![eos]].concat();
        assert_eq!(full.encode(text).unwrap(), want, "{text:?}");
        let got = cut.encode(text).unwrap();
        let keep = ids.len().min(6);
        assert_eq!(got, [vec![bos], ids[..keep].to_vec(), vec![eos]].concat(), "{text:?}");
        assert_eq!(hf_cut.encode(text).unwrap(), got, "{text:?}");
        truncated += usize::from(ids.len() > 6);
    }
    assert!(truncated > 5000);

    // Only BOS: it is kept and counted.
    let dir = model_dir("small", Some(r#"{"add_bos_token": true}"#));
    let tok = TextTokenizer::load(dir.path(), 3).unwrap();
    assert_eq!(
        tok.encode("商品价格很好，质量不错").unwrap(),
        [&[bos][..], &sp.encode("商品价格很好，质量不错").unwrap()[..2]].concat()
    );
}

/// Runs `f`, expecting bad input (exit status 2) whose message contains every one of `needles`.
fn assert_input_error<T>(result: anyhow::Result<T>, needles: &[&str]) {
    let Err(err) = result else { panic!("expected an error containing {needles:?}") };
    let msg = one_line(&err);
    assert_eq!(exit_status(&err), 2, "{msg}");
    for needle in needles {
        assert!(msg.contains(needle), "{msg:?} does not mention {needle:?}");
    }
}

#[test]
fn bad_tokenizer_config_and_missing_files_are_input_errors() {
    let dir = model_dir("small", Some(r#"{"add_bos_token": "yes"}"#));
    assert_input_error(TextTokenizer::load(dir.path(), 10), &["tokenizer_config.json", "add_bos_token"]);
    let dir = model_dir("small", Some("{not json"));
    assert_input_error(TextTokenizer::load(dir.path(), 10), &["tokenizer_config.json", "not valid JSON"]);
    let dir = model_dir("small", Some(r#"{"add_bos_token": true, "add_eos_token": true}"#));
    assert_input_error(TextTokenizer::load(dir.path(), 1), &["--max-tokens 1", "2 special tokens"]);
    assert_input_error(TextTokenizer::load(dir.path(), 0), &["--max-tokens"]);
    let empty = tempfile::tempdir().unwrap();
    assert_input_error(TextTokenizer::load(empty.path(), 10), &["no tokenizer.json or tokenizer.model"]);
    assert_input_error(SentencePiece::load(&empty.path().join("tokenizer.model")), &["tokenizer.model", "cannot read"]);
}

#[test]
fn exported_tokenizer_json_encodes_exactly_as_sentencepiece() {
    let keep = std::env::var_os("LEARN_KERN_SP_EXPORT_DIR").map(PathBuf::from);
    for model in EXPORTABLE {
        let json = export_tokenizer_json(&fixture(&format!("{model}.model"))).unwrap();
        if let Some(dir) = &keep {
            std::fs::write(dir.join(format!("{model}.json")), &json).unwrap();
        }
        let tok: tokenizers::Tokenizer = json.parse().unwrap();
        assert_matches(model, "exported tokenizer.json", |text| {
            tok.encode_fast(text, true).unwrap().get_ids().to_vec()
        });
    }
}

#[test]
fn export_refuses_models_tokenizer_json_cannot_express() {
    assert_input_error(export_tokenizer_json(&fixture("large-ties.model")), &["large-ties.model", "share", "score"]);
    assert_input_error(export_tokenizer_json(&fixture("odd.model")), &["odd.model", "UNUSED"]);
}

#[test]
fn long_texts_encode_in_near_linear_time() {
    // Exactness on long texts is in the fixtures (four strings of 12k to 45k characters); this is speed.
    let sp = SentencePiece::load(&fixture("large.model")).unwrap();
    let mut text: String = cases().strings.iter().map(String::as_str).collect();
    text.push_str(&"哈".repeat(100_000));
    text.push_str(&" ".repeat(100_000));
    text.push_str(&"\t ".repeat(50_000));
    let chars = text.chars().count();
    assert!(chars > 600_000);
    let start = std::time::Instant::now();
    let ids = sp.encode(&text).unwrap();
    let elapsed = start.elapsed();
    // O(n log n) takes well under a second even unoptimised; a quadratic pass would take minutes.
    assert!(elapsed.as_secs_f64() < 10.0, "{chars} characters took {elapsed:?}");
    assert!(ids.len() > 100_000);
}

/// Minimal protobuf writer for hand-built models.
mod wire {
    pub fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    pub fn bytes(out: &mut Vec<u8>, field: u64, payload: &[u8]) {
        varint(out, field << 3 | 2);
        varint(out, payload.len() as u64);
        out.extend_from_slice(payload);
    }
    pub fn uint(out: &mut Vec<u8>, field: u64, v: u64) {
        varint(out, field << 3);
        varint(out, v);
    }
    pub fn float(out: &mut Vec<u8>, field: u64, v: f32) {
        varint(out, field << 3 | 5);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

const NORMAL: u64 = 1;
const UNKNOWN: u64 = 2;
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;
const UNUSED: u64 = 5;
const BYTE: u64 = 6;

/// A ModelProto: pieces (text, score, type), trainer fields (number, value) and normalizer fields.
fn model_bytes(pieces: &[(&str, f32, u64)], trainer: &[(u64, u64)], normalizer: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (text, score, kind) in pieces {
        let mut p = Vec::new();
        wire::bytes(&mut p, 1, text.as_bytes());
        wire::float(&mut p, 2, *score);
        wire::uint(&mut p, 3, *kind);
        wire::bytes(&mut out, 1, &p);
    }
    let mut t = Vec::new();
    for &(field, v) in trainer {
        wire::uint(&mut t, field, v);
    }
    wire::bytes(&mut out, 2, &t);
    let mut n = Vec::new();
    wire::bytes(&mut n, 1, b"identity");
    for &(field, v) in normalizer {
        wire::uint(&mut n, field, v);
    }
    wire::bytes(&mut out, 3, &n);
    out
}

const BPE: (u64, u64) = (3, 2);
const NO_DUMMY_PREFIX: (u64, u64) = (3, 0);
const KEEP_SPACES: (u64, u64) = (4, 0);

fn abc(extra: &[(&'static str, f32, u64)]) -> Vec<(&'static str, f32, u64)> {
    let mut pieces = vec![("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)];
    pieces.extend([("a", -10.0, NORMAL), ("b", -10.0, NORMAL), ("c", -10.0, NORMAL)]);
    pieces.extend_from_slice(extra);
    pieces
}

fn hand_built(pieces: &[(&str, f32, u64)], trainer: &[(u64, u64)]) -> anyhow::Result<SentencePiece> {
    SentencePiece::from_bytes(&model_bytes(pieces, trainer, &[NO_DUMMY_PREFIX, KEEP_SPACES]), "hand.model")
}

#[test]
fn ties_go_to_the_leftmost_pair_and_unused_pieces_are_split_back() {
    // Values checked with sentencepiece 0.2 on the same hand-built models.
    let tied = hand_built(&abc(&[("ab", -1.0, NORMAL), ("bc", -1.0, NORMAL)]), &[BPE]).unwrap();
    assert_eq!(tied.encode("abc").unwrap(), [6, 5]);
    assert_eq!(tied.encode("abcabc").unwrap(), [6, 5, 6, 5]);
    // Unknown characters without byte fallback: one <unk> per run.
    assert_eq!(tied.encode("xabx").unwrap(), [0, 6, 0]);
    assert_eq!(tied.encode("xyab zz").unwrap(), [0, 6, 0]);
    let bc_first = hand_built(&abc(&[("ab", -2.0, NORMAL), ("bc", -1.0, NORMAL)]), &[BPE]).unwrap();
    assert_eq!(bc_first.encode("abc").unwrap(), [3, 7]);
    // -0.0 and 0.0 tie as well.
    let zeros = hand_built(&abc(&[("ab", 0.0, NORMAL), ("bc", -0.0, NORMAL)]), &[BPE]).unwrap();
    assert_eq!(zeros.encode("abc").unwrap(), [6, 5]);
    let unused = hand_built(&abc(&[("ab", -1.0, NORMAL), ("abc", -2.0, UNUSED)]), &[BPE]).unwrap();
    assert_eq!(unused.encode("abc").unwrap(), [6, 5]);
    // Byte fallback: an unknown character becomes its UTF-8 bytes.
    let mut pieces = abc(&[]);
    let bytes: Vec<String> = (0..256).map(|b| format!("<0x{b:02X}>")).collect();
    pieces.extend(bytes.iter().map(|b| (b.as_str(), 0.0, BYTE)));
    let fallback = hand_built(&pieces, &[BPE, (35, 1)]).unwrap();
    assert_eq!(fallback.encode("a中").unwrap(), [3, 6 + 0xe4, 6 + 0xb8, 6 + 0xad]);
    // A tie between overlapping pieces has no exact tokenizer.json.
    let sp_path = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(sp_path.path(), model_bytes(&abc(&[("ab", -1.0, NORMAL), ("bc", -1.0, NORMAL)]), &[BPE], &[]))
        .unwrap();
    assert_input_error(export_tokenizer_json(sp_path.path()), &["\"ab\"", "\"bc\"", "share the score"]);
}

#[test]
fn unsupported_or_broken_models_are_input_errors_naming_file_and_setting() {
    let pieces = abc(&[("ab", -1.0, NORMAL)]);
    let cases: Vec<(Vec<u8>, Vec<&str>)> = vec![
        (model_bytes(&pieces, &[], &[]), vec!["UNIGRAM", "only BPE"]),
        (model_bytes(&pieces, &[(3, 1)], &[]), vec!["UNIGRAM"]),
        (model_bytes(&pieces, &[(3, 3)], &[]), vec!["WORD"]),
        (model_bytes(&pieces, &[(3, 4)], &[]), vec!["CHAR"]),
        (b"{\"version\": \"1.0\", \"model\": {}}".to_vec(), vec!["not a SentencePiece model"]),
        (vec![0x0a, 0x50, 1, 2, 3], vec!["not a SentencePiece model", "runs past the end"]),
        (Vec::new(), vec!["no pieces"]),
        (model_bytes(&pieces[1..], &[BPE], &[]), vec!["no piece has type UNKNOWN"]),
        (
            model_bytes(&[pieces.clone(), vec![("ab", -2.0, NORMAL)]].concat(), &[BPE], &[]),
            vec!["\"ab\" is defined twice"],
        ),
        (model_bytes(&abc(&[("ab", f32::NAN, NORMAL)]), &[BPE], &[]), vec!["NaN score"]),
        (model_bytes(&abc(&[("<0x41>", 0.0, BYTE)]), &[BPE], &[]), vec!["byte_fallback"]),
        (model_bytes(&pieces, &[BPE, (35, 1)], &[]), vec!["byte_fallback", "<0x00>", "missing"]),
        (model_bytes(&abc(&[("|", 0.0, CONTROL)]), &[BPE], &[]), vec!["control piece", "single character"]),
    ];
    for (bytes, needles) in cases {
        let file = tempfile::Builder::new().suffix(".model").tempfile().unwrap();
        std::fs::write(file.path(), &bytes).unwrap();
        let mut needles = needles;
        let name = file.path().display().to_string();
        needles.push(&name);
        assert_input_error(SentencePiece::load(file.path()), &needles);
    }
    // A unigram model trained by sentencepiece, found by TextTokenizer in a model directory.
    assert_input_error(SentencePiece::load(&fixture("unigram.model")), &["unigram.model", "UNIGRAM", "only BPE"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("unigram.model"), dir.path().join("tokenizer.model")).unwrap();
    assert_input_error(TextTokenizer::load(dir.path(), 10), &["tokenizer.model", "UNIGRAM"]);
    // A precompiled normalisation map (as nmt_nfkc models carry).
    let mut bytes = model_bytes(&pieces, &[BPE], &[]);
    let mut norm = Vec::new();
    wire::bytes(&mut norm, 1, b"nmt_nfkc");
    wire::bytes(&mut norm, 2, &[1, 2, 3, 4, 5, 6, 7, 8]);
    wire::bytes(&mut bytes, 3, &norm);
    assert_input_error(SentencePiece::from_bytes(&bytes, "nfkc.model"), &["nfkc.model", "nmt_nfkc", "precompiled"]);
}

#[test]
fn export_refusals_name_the_setting() {
    let refused = |pieces: &[(&str, f32, u64)], trainer: &[(u64, u64)], normalizer: &[(u64, u64)], needle: &str| {
        let file = tempfile::Builder::new().suffix(".model").tempfile().unwrap();
        std::fs::write(file.path(), model_bytes(pieces, trainer, normalizer)).unwrap();
        // The model itself is fine for encoding.
        SentencePiece::load(file.path()).unwrap();
        let name = file.path().display().to_string();
        assert_input_error(export_tokenizer_json(file.path()), &[&name, "no exact tokenizer.json", needle]);
    };
    let user = |text: &'static str| abc(&[("ab", -1.0, NORMAL), (text, 0.0, USER_DEFINED)]);
    refused(&user("x\u{2581}"), &[BPE], &[NO_DUMMY_PREFIX], "ends with");
    refused(&user("<m>"), &[BPE], &[], "dummy prefix");
    refused(&user("a b"), &[BPE], &[NO_DUMMY_PREFIX, KEEP_SPACES], "contains a space");
    refused(&abc(&[("ab", -1.0, NORMAL)]), &[BPE, (24, 1)], &[], "treat_whitespace_as_suffix");
    refused(&abc(&[("ab", -1.0, NORMAL), ("ad", -2.0, NORMAL)]), &[BPE], &[], "\"d\", which has no piece");
    let mut one_char_unk = abc(&[("ab", -1.0, NORMAL)]);
    one_char_unk[0].0 = "?";
    refused(&one_char_unk, &[BPE], &[], "single character");
    // Whitespace as a suffix without the dummy prefix changes nothing, and exports.
    let file = tempfile::Builder::new().suffix(".model").tempfile().unwrap();
    std::fs::write(file.path(), model_bytes(&abc(&[("ab", -1.0, NORMAL)]), &[BPE, (24, 1)], &[NO_DUMMY_PREFIX]))
        .unwrap();
    let tok: tokenizers::Tokenizer = export_tokenizer_json(file.path()).unwrap().parse().unwrap();
    assert_eq!(tok.encode_fast("ab c", false).unwrap().get_ids(), [6, 0, 5]);
}

/// Throughput on the 10,000 fixture strings: `cargo test --release --test sentencepiece -- --ignored --nocapture`.
#[test]
#[ignore]
fn throughput() {
    let cases = cases();
    for model in MODELS {
        let sp = SentencePiece::load(&fixture(&format!("{model}.model"))).unwrap();
        let mut best = f64::MAX;
        for _ in 0..5 {
            let start = std::time::Instant::now();
            let n: usize = cases.strings.iter().map(|s| sp.encode(s).unwrap().len()).sum();
            std::hint::black_box(n);
            best = best.min(start.elapsed().as_secs_f64());
        }
        let start = std::time::Instant::now();
        let n: usize = cases.strings.par_iter().map(|s| sp.encode(s).unwrap().len()).sum();
        std::hint::black_box(n);
        let parallel = start.elapsed().as_secs_f64();
        let count = cases.strings.len() as f64;
        println!(
            "{model}: {:.0} strings/s on one thread, {:.0} strings/s on {} threads",
            count / best,
            count / parallel,
            rayon::current_num_threads()
        );
    }
}
