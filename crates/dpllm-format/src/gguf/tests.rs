//! The GGUF reader against a file written by an independent implementation
//! (gguf-py: `tools/make_gguf_fixtures.py`), and on corrupt input.

use std::path::{Path, PathBuf};

use super::*;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf/blocks.gguf")
}

#[test]
fn metadata_of_every_value_type_and_the_alignment() {
    let f = GgufFile::open(&fixture()).unwrap();
    assert_eq!(f.version, 3);
    let get = |k: &str| f.get(k).unwrap_or_else(|| panic!("no {k}")).clone();
    assert_eq!(get("test.u8"), Value::U8(200));
    assert_eq!(get("test.i8"), Value::I8(-5));
    assert_eq!(get("test.u16"), Value::U16(60000));
    assert_eq!(get("test.i16"), Value::I16(-300));
    assert_eq!(get("test.u32"), Value::U32(4_000_000_000));
    assert_eq!(get("test.i32"), Value::I32(-7));
    assert_eq!(get("test.u64"), Value::U64((1 << 40) + 3));
    assert_eq!(get("test.i64"), Value::I64(-(1 << 40)));
    assert_eq!(get("test.f32"), Value::F32(0.5));
    assert_eq!(get("test.f64"), Value::F64(1e-300));
    assert_eq!(get("test.bool"), Value::Bool(true));
    assert_eq!(get("test.string").as_str(), Some("héllo"));
    let arr = get("test.strings");
    let strings: Vec<&str> = arr
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(strings, ["a", "bc", ""]);
    assert_eq!(
        get("test.ints")
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(get("general.architecture").as_str(), Some("llama"));
    assert_eq!(get("general.alignment").as_u64(), Some(64));
    assert!(
        f.tensors().iter().all(|t| t.offset % 64 == 0),
        "tensor data not at the declared alignment"
    );
    assert_eq!(f.tensor("q.Q4_K").unwrap().shape, [2, 256]);
}

#[test]
fn every_type_dequantizes_like_the_reference() {
    let f = GgufFile::open(&fixture()).unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut checked = 0;
    for t in f.tensors().iter().filter(|t| t.name.starts_with("q.")) {
        let got = f.dequantize(&t.name).unwrap();
        let want = f.dequantize(&format!("want.{}", &t.name[2..])).unwrap();
        assert_eq!(got.len(), want.len(), "{}", t.name);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                "{} ({:?}) element {i}: {g} vs {w}",
                t.name,
                t.dtype
            );
        }
        seen.insert(t.dtype);
        checked += 1;
    }
    for ty in [0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30] {
        assert!(
            seen.contains(&GgmlType::from_id(ty).unwrap()),
            "type {ty} has no fixture"
        );
    }
    // The real blocks of SmolLM2 (Q4_1 linears, Q8_0 embedding) are in the fixture when it was made with them.
    let real = f
        .tensors()
        .iter()
        .filter(|t| t.name.starts_with("q.real."))
        .count();
    eprintln!("{checked} tensors checked against gguf-py, {real} of them real SmolLM2 blocks");
}

/// A minimal GGUF writer for corrupt-input cases: metadata as raw (key, type, value bytes).
fn build(
    version: u32,
    kv: &[(&str, u32, Vec<u8>)],
    tensors: &[(&str, Vec<u64>, u32, u64)],
    data: usize,
) -> Vec<u8> {
    let mut b = Vec::new();
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    b.extend(MAGIC.to_le_bytes());
    b.extend(version.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kv.len() as u64).to_le_bytes());
    for (k, ty, v) in kv {
        s(&mut b, k);
        b.extend(ty.to_le_bytes());
        b.extend(v);
    }
    for (name, dims, ty, off) in tensors {
        s(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(off.to_le_bytes());
    }
    b.resize(b.len().div_ceil(32) * 32 + data, 0);
    b
}

fn open_bytes(bytes: &[u8]) -> std::result::Result<GgufFile, String> {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m.gguf");
    std::fs::write(&p, bytes).unwrap();
    GgufFile::open(&p).map_err(|e| e.to_string())
}

#[test]
fn corrupt_files_are_clear_errors() {
    let ok = build(
        3,
        &[("a", 4, 7u32.to_le_bytes().to_vec())],
        &[("t", vec![32, 2], 8, 0)],
        68,
    );
    let f = open_bytes(&ok).unwrap();
    assert_eq!(f.tensor("t").unwrap().shape, [2, 32]);
    assert_eq!(f.dequantize("t").unwrap(), vec![0.0; 64]);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"GGML\x03\x00\x00\x00".to_vec(), "no GGUF magic"),
        (build(1, &[], &[], 0), "version 1"),
        (
            build(3, &[], &[("t", vec![32, 2], 8, 0)], 10),
            "beyond the end",
        ),
        (
            build(3, &[], &[("t", vec![32, 2], 23, 0)], 68),
            "ggml type 23",
        ),
        (build(3, &[], &[("t", vec![33], 8, 0)], 68), "whole"),
        (
            build(3, &[], &[("t", vec![32, 2], 8, 4)], 128),
            "misaligned",
        ),
        (build(3, &[], &[("t", vec![32, 0], 8, 0)], 68), "whole"),
        (
            build(3, &[], &[("t", vec![1 << 40, 1 << 40], 0, 0)], 68),
            "overflows",
        ),
        (
            build(3, &[], &[("t", vec![32, 1, 1, 1, 1], 8, 0)], 68),
            "5 dimensions",
        ),
        (
            build(3, &[("a", 99, vec![0; 8])], &[], 0),
            "unknown metadata value type 99",
        ),
        (build(3, &[("a", 7, vec![2])], &[], 0), "bool value 2"),
        (
            build(3, &[("a", 8, u64::MAX.to_le_bytes().to_vec())], &[], 0),
            "string length",
        ),
        (
            build(
                3,
                &[(
                    "a",
                    9,
                    [
                        8u32.to_le_bytes().to_vec(),
                        (1u64 << 60).to_le_bytes().to_vec(),
                    ]
                    .concat(),
                )],
                &[],
                0,
            ),
            "array count",
        ),
        (
            build(
                3,
                &[("general.alignment", 4, 3u32.to_le_bytes().to_vec())],
                &[],
                0,
            ),
            "power of two",
        ),
        (
            build(
                3,
                &[("a", 4, vec![1, 0, 0, 0]), ("a", 4, vec![1, 0, 0, 0])],
                &[],
                0,
            ),
            "twice",
        ),
        (
            build(
                3,
                &[],
                &[("t", vec![32], 8, 0), ("t", vec![32], 8, 64)],
                128,
            ),
            "twice",
        ),
        (vec![], "the file ends"),
    ];
    for (bytes, want) in cases {
        let e = open_bytes(&bytes)
            .err()
            .unwrap_or_else(|| panic!("accepted a file that should fail with {want:?}"));
        assert!(e.contains(want) && e.contains("m.gguf"), "{want}: {e}");
    }
    // Every truncation of a valid file is an error, never a panic.
    let real = std::fs::read(fixture()).unwrap();
    for n in (0..real.len()).step_by(97) {
        assert!(
            open_bytes(&real[..n]).is_err(),
            "truncated to {n} bytes and accepted"
        );
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, failure_persistence: None, ..Default::default() })]

    /// Byte edits anywhere in a valid file: open and dequantize every tensor, or fail cleanly.
    #[test]
    fn mutated_files_read_or_fail_cleanly(edits in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 1..8)) {
        let mut b = std::fs::read(fixture()).unwrap();
        let n = b.len();
        // Most edits land in the header, where the structure is.
        for (i, v) in edits {
            let at = if i % 4 == 0 { i % n } else { i % 3000.min(n) };
            b[at] = v;
        }
        if let Ok(f) = open_bytes(&b) {
            for t in f.tensors() {
                let _ = f.dequantize(&t.name);
            }
        }
    }
}
