//! Text tokenizer for a Hugging Face model directory (a wrapper over the
//! `tokenizers` crate that also reads `tokenizer_config.json` and
//! `generation_config.json`), plus an incremental detokenizer for streaming.

use crate::chat_template::{token_content, ChatTemplate};
use crate::error::{EngineError, Result};
use std::path::Path;
use tokenizers::Tokenizer;

/// A loaded tokenizer with the model's special-token ids and chat template.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Vocabulary size with added tokens, counted once: `tokenizers` builds
    /// the whole vocabulary map to count it, which cost a streamed decode
    /// (two decodes a token) more than the decoding.
    vocab: usize,
    bos: Option<u32>,
    eos: Vec<u32>,
    add_bos_token: bool,
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos_token", &self.add_bos_token)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// A template error from a model file, naming the file.
fn in_file(e: EngineError, path: &Path) -> EngineError {
    EngineError::ModelFiles(format!("{e} (in {})", path.display()))
}

/// Read and parse an optional JSON file: `Ok(None)` if absent, an error naming
/// the path if unreadable or invalid.
fn read_optional_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| EngineError::ModelFiles(format!("failed to read {}: {e}", path.display())))?;
    let v = serde_json::from_str(&text)
        .map_err(|e| EngineError::ModelFiles(format!("invalid JSON in {}: {e}", path.display())))?;
    Ok(Some(v))
}

/// Parse a token id field that may be an integer, a list of integers, or null.
fn ids_from_json(v: Option<&serde_json::Value>, what: &str, path: &Path) -> Result<Vec<u32>> {
    let to_id = |x: &serde_json::Value| -> Result<u32> {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                EngineError::ModelFiles(format!(
                    "{what} in {} must be a non-negative integer, got {x}",
                    path.display()
                ))
            })
    };
    match v {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(list)) => list.iter().map(to_id).collect(),
        Some(x) => Ok(vec![to_id(x)?]),
    }
}

impl TextTokenizer {
    /// Load DIR/tokenizer.json (required: clear error naming the path if missing or
    /// invalid), and when present DIR/tokenizer_config.json (add_bos_token,
    /// bos_token, eos_token — each may be a string or an object {"content": ...} —,
    /// chat_template; a DIR/chat_template.jinja file is used when the config has no
    /// template) and DIR/generation_config.json (eos_token_id: int or list;
    /// bos_token_id). `config_bos`/`config_eos` are fallbacks from config.json.
    pub fn from_dir(
        dir: &Path,
        config_bos: Option<u32>,
        config_eos: &[u32],
    ) -> Result<TextTokenizer> {
        if dpllm_format::gguf::is_gguf(dir) {
            return Self::from_gguf(dir, config_bos, config_eos);
        }
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(EngineError::ModelFiles(format!(
                "tokenizer file {} not found",
                tok_path.display()
            )));
        }
        let inner = Tokenizer::from_file(&tok_path).map_err(|e| {
            EngineError::ModelFiles(format!(
                "failed to load tokenizer {}: {e}",
                tok_path.display()
            ))
        })?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc = read_optional_json(&tc_path)?;
        let gc_path = dir.join("generation_config.json");
        let gc = read_optional_json(&gc_path)?;
        let jinja_path = dir.join("chat_template.jinja");
        let jinja = if jinja_path.is_file() {
            Some((
                std::fs::read_to_string(&jinja_path).map_err(|e| {
                    EngineError::ModelFiles(format!("failed to read {}: {e}", jinja_path.display()))
                })?,
                jinja_path,
            ))
        } else {
            None
        };
        Self::from_parts(
            inner,
            (tc, &tc_path),
            (gc, &gc_path),
            jinja,
            config_bos,
            config_eos,
        )
    }

    /// The tokenizer of a GGUF file, rebuilt from its `tokenizer.*` metadata
    /// (vocabulary, merges, pre-tokenizer, special tokens, chat template).
    pub fn from_gguf(
        path: &Path,
        config_bos: Option<u32>,
        config_eos: &[u32],
    ) -> Result<TextTokenizer> {
        let file = dpllm_format::gguf::GgufFile::open(path)?;
        let (json, tc) = dpllm_format::gguf::model::tokenizer_files(&file)?;
        let inner = Tokenizer::from_bytes(json.to_string().as_bytes()).map_err(|e| {
            EngineError::ModelFiles(format!(
                "cannot build the tokenizer of {} from its metadata: {e}",
                path.display()
            ))
        })?;
        Self::from_parts(
            inner,
            (Some(tc), path),
            (None, path),
            None,
            config_bos,
            config_eos,
        )
    }

    /// Special tokens and chat template from a tokenizer config `tc` and a
    /// generation config `gc` (each with the path that names it in errors), a
    /// chat template file used when `tc` has none, and config.json's ids as fallbacks.
    fn from_parts(
        inner: Tokenizer,
        (tc, tc_path): (Option<serde_json::Value>, &Path),
        (gc, gc_path): (Option<serde_json::Value>, &Path),
        jinja: Option<(String, std::path::PathBuf)>,
        config_bos: Option<u32>,
        config_eos: &[u32],
    ) -> Result<TextTokenizer> {
        let lookup =
            |v: Option<&serde_json::Value>| token_content(v).and_then(|s| inner.token_to_id(&s));

        // BOS: the tokenizer's own bos_token, else generation_config, else config.json.
        let tc_bos = tc.as_ref().and_then(|v| lookup(v.get("bos_token")));
        let gc_bos = match &gc {
            Some(v) => ids_from_json(v.get("bos_token_id"), "bos_token_id", gc_path)?
                .first()
                .copied(),
            None => None,
        };
        let bos = tc_bos.or(gc_bos).or(config_bos);

        // EOS: union of generation_config, tokenizer_config and config.json, in that order.
        let mut eos: Vec<u32> = Vec::new();
        if let Some(v) = &gc {
            eos.extend(ids_from_json(
                v.get("eos_token_id"),
                "eos_token_id",
                gc_path,
            )?);
        }
        if let Some(id) = tc.as_ref().and_then(|v| lookup(v.get("eos_token"))) {
            eos.push(id);
        }
        eos.extend_from_slice(config_eos);
        let mut seen = std::collections::HashSet::new();
        eos.retain(|id| seen.insert(*id));

        let add_bos_token = tc
            .as_ref()
            .and_then(|v| v.get("add_bos_token"))
            .and_then(|b| b.as_bool())
            .unwrap_or(false);

        let mut chat_template = match &tc {
            Some(v) => ChatTemplate::from_tokenizer_config(v).map_err(|e| in_file(e, tc_path))?,
            None => None,
        };
        if let (None, Some((src, jinja_path))) = (&chat_template, jinja) {
            let bos_s = tc
                .as_ref()
                .and_then(|v| token_content(v.get("bos_token")))
                .unwrap_or_default();
            let eos_s = tc
                .as_ref()
                .and_then(|v| token_content(v.get("eos_token")))
                .unwrap_or_default();
            chat_template =
                Some(ChatTemplate::new(&src, &bos_s, &eos_s).map_err(|e| in_file(e, &jinja_path))?);
        }
        Ok(TextTokenizer {
            vocab: inner.get_vocab_size(true),
            inner,
            bos,
            eos,
            add_bos_token,
            chat_template,
        })
    }

    /// Encode text. When `add_special` is true: run the tokenizer's own
    /// post-processor (add_special_tokens=true), and if tokenizer_config says
    /// add_bos_token=true and the result does not start with the BOS id, prepend BOS.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| EngineError::Tokenize(format!("encode failed: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special && self.add_bos_token {
            if let Some(bos) = self.bos {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Decode ids to text; with `skip_special` special tokens (e.g. `<s>`) are omitted.
    /// Ids outside the vocabulary are an error.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let vocab = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(EngineError::TokenOutOfRange { token: *bad, vocab });
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| EngineError::Tokenize(format!("decode failed: {e}")))
    }

    /// The BOS token id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Union of eos ids from generation_config, tokenizer_config's eos_token, and config.json.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Whether `id` is one of the end-of-sequence ids.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// The chat template from tokenizer_config.json (or chat_template.jinja), if any.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The underlying `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// Incremental detokenizer for streaming: returns only the newly completed text
/// after each token, never splitting a multi-byte UTF-8 character (decodes
/// tokens[prefix..] and tokens[prefix..read] and emits the difference only when
/// it does not end with U+FFFD).
pub struct TokenStream<'a> {
    tok: &'a TextTokenizer,
    tokens: Vec<u32>,
    prefix: usize,
    read: usize,
    skip_special: bool,
}

impl<'a> TokenStream<'a> {
    /// Start an empty stream over `tok` (special tokens are kept in the output).
    pub fn new(tok: &'a TextTokenizer) -> Self {
        TokenStream {
            tok,
            tokens: Vec::new(),
            prefix: 0,
            read: 0,
            skip_special: false,
        }
    }

    /// Builder option: omit special tokens from the streamed text.
    pub fn skip_special(mut self, skip: bool) -> Self {
        self.skip_special = skip;
        self
    }

    /// All tokens pushed so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Add a token; returns the newly completed text, or `None` if nothing can be
    /// emitted yet (e.g. an incomplete UTF-8 sequence).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.tokens.push(id);
        let prefix_text = self
            .tok
            .decode(&self.tokens[self.prefix..self.read], self.skip_special)?;
        let new_text = self
            .tok
            .decode(&self.tokens[self.prefix..], self.skip_special)?;
        if new_text.len() > prefix_text.len() && !new_text.ends_with('\u{FFFD}') {
            let delta = new_text.get(prefix_text.len()..).unwrap_or("").to_string();
            self.prefix = self.read;
            self.read = self.tokens.len();
            Ok(Some(delta))
        } else {
            Ok(None)
        }
    }

    /// Flush whatever text is still pending (possibly ending in U+FFFD if the
    /// stream stopped inside a character); returns `None` if nothing is pending.
    pub fn finish(&mut self) -> Result<Option<String>> {
        if self.read >= self.tokens.len() {
            return Ok(None);
        }
        let prefix_text = self
            .tok
            .decode(&self.tokens[self.prefix..self.read], self.skip_special)?;
        let new_text = self
            .tok
            .decode(&self.tokens[self.prefix..], self.skip_special)?;
        self.prefix = self.read;
        self.read = self.tokens.len();
        match new_text.get(prefix_text.len()..) {
            Some(d) if !d.is_empty() => Ok(Some(d.to_string())),
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn model_dir() -> Option<PathBuf> {
        let p = PathBuf::from("/work/shared/models/docs-llama-12m");
        if p.join("tokenizer.json").is_file() {
            Some(p)
        } else {
            println!("skipping: {} not available", p.display());
            None
        }
    }

    fn load() -> Option<TextTokenizer> {
        let dir = model_dir()?;
        Some(TextTokenizer::from_dir(&dir, Some(1), &[2]).expect("load tokenizer"))
    }

    #[test]
    fn loads_real_model_metadata() {
        let Some(t) = load() else { return };
        assert_eq!(t.bos_id(), Some(1));
        assert_eq!(t.eos_ids(), &[2]);
        assert!(t.is_eos(2) && !t.is_eos(1));
        assert_eq!(t.vocab_size(), 8192);
        assert!(t.chat_template().is_none());
    }

    #[test]
    fn matches_python_reference_ids() {
        let Some(t) = load() else { return };
        let path = "/work/shared/data/docs/test.txt";
        let Ok(text) = std::fs::read_to_string(path) else {
            println!("skipping: {path} not available");
            return;
        };
        let head: String = text.chars().take(4000).collect();
        let ids = t.encode(&head, false).unwrap();
        assert_eq!(&ids[..8], &[785, 6273, 2731, 19, 15, 1390, 3485, 2574]);
        assert_eq!(t.decode(&ids, false).unwrap(), head);
        let with = t.encode(&head, true).unwrap();
        assert_eq!(with[0], 1);
        assert_eq!(&with[1..], &ids[..]);
    }

    #[test]
    fn roundtrip_multibyte() {
        let Some(t) = load() else { return };
        for s in [
            "héllo wörld",
            "日本語のテキスト",
            "emoji 🦀🚀 and ñ",
            "  leading spaces\nnew line\ttab",
            "Ελληνικά ✓",
        ] {
            let ids = t.encode(s, false).unwrap();
            assert_eq!(t.decode(&ids, false).unwrap(), s);
            let ids = t.encode(s, true).unwrap();
            assert_eq!(ids[0], 1);
            assert_eq!(t.decode(&ids, true).unwrap(), s);
            assert_eq!(t.decode(&ids, false).unwrap(), format!("<s>{s}"));
        }
        assert!(t.decode(&[1_000_000], false).is_err());
    }

    #[test]
    fn streaming_matches_decode() {
        let Some(t) = load() else { return };
        let text = "Café crème 🦀 naïve — résumé 日本 👩‍👩‍👧 done.";
        let ids = t.encode(text, false).unwrap();
        let mut stream = TokenStream::new(&t);
        let mut out = String::new();
        let mut pieces = 0;
        let mut held = 0;
        for &id in &ids {
            if let Some(s) = stream.push(id).unwrap() {
                assert!(!s.contains('\u{FFFD}'), "split character in {s:?}");
                out.push_str(&s);
                pieces += 1;
            } else {
                held += 1;
            }
        }
        assert!(
            held > 0,
            "expected some tokens to end mid-character (held back)"
        );
        if let Some(s) = stream.finish().unwrap() {
            out.push_str(&s);
        }
        assert_eq!(out, t.decode(&ids, false).unwrap());
        assert_eq!(out, text);
        assert!(
            pieces > 3,
            "expected incremental output, got {pieces} pieces"
        );
        assert_eq!(stream.tokens(), &ids[..]);
    }

    #[test]
    fn streaming_skips_special_when_asked() {
        let Some(t) = load() else { return };
        let mut ids = t.encode("hi there", true).unwrap();
        ids.push(2);
        let mut s = TokenStream::new(&t).skip_special(true);
        let mut out = String::new();
        for &id in &ids {
            if let Some(p) = s.push(id).unwrap() {
                out.push_str(&p);
            }
        }
        out.push_str(&s.finish().unwrap().unwrap_or_default());
        assert_eq!(out, "hi there");
    }

    #[test]
    fn missing_or_corrupt_tokenizer_json_names_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = TextTokenizer::from_dir(dir.path(), None, &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("not found"),
            "{err}"
        );
        std::fs::write(dir.path().join("tokenizer.json"), "{ this is not json").unwrap();
        let err = format!(
            "{:#}",
            TextTokenizer::from_dir(dir.path(), None, &[]).unwrap_err()
        );
        assert!(
            err.contains(&dir.path().join("tokenizer.json").display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn reads_configs_in_all_shapes() {
        let Some(src) = model_dir() else { return };
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            src.join("tokenizer.json"),
            dir.path().join("tokenizer.json"),
        )
        .unwrap();
        // no configs: only fallbacks; no BOS prepended
        let t = TextTokenizer::from_dir(dir.path(), Some(1), &[2, 0]).unwrap();
        assert_eq!(t.bos_id(), Some(1));
        assert_eq!(t.eos_ids(), &[2, 0]);
        assert_ne!(t.encode("hello", true).unwrap()[0], 1);

        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"add_bos_token": true, "bos_token": {"content": "<s>", "lstrip": false},
                "eos_token": {"content": "</s>"}, "chat_template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"bos_token_id": 1, "eos_token_id": [0, 2]}"#,
        )
        .unwrap();
        let t = TextTokenizer::from_dir(dir.path(), None, &[7]).unwrap();
        assert_eq!(t.bos_id(), Some(1));
        assert_eq!(t.eos_ids(), &[0, 2, 7]);
        assert_eq!(t.encode("hello", true).unwrap()[0], 1);
        let ct = t.chat_template().expect("template");
        let out = ct
            .render(
                &[crate::chat_template::ChatMessage::new("user", "x")],
                false,
            )
            .unwrap();
        assert_eq!(out, "<s>x</s>");

        std::fs::write(dir.path().join("generation_config.json"), "not json").unwrap();
        let err = format!(
            "{:#}",
            TextTokenizer::from_dir(dir.path(), None, &[]).unwrap_err()
        );
        assert!(err.contains("generation_config.json"), "{err}");
    }
}
