//! Tokenizers (from GGUF metadata or `tokenizer.json`) and chat templates.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::Tokenizer;

/// A tokenizer plus what generation and evaluation need to know about it.
#[derive(Clone)]
pub struct TextCodec {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl TextCodec {
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let model = ct
            .metadata
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok());
        let mut tokenizer = if model.map(String::as_str) == Some("llama") {
            sentencepiece_from_gguf(ct)?
        } else {
            Tokenizer::from_gguf(ct)
                .map_err(|e| anyhow!("cannot build the tokenizer from GGUF metadata: {e}"))?
        };
        let pre = ct
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok());
        // llama.cpp's `smollm`/`starcoder` pre-tokenizers split every digit on
        // its own before the GPT-2 regex, as the original tokenizer.json does.
        // candle's GGUF tokenizer falls back to plain GPT-2 for them.
        if matches!(
            pre.map(String::as_str),
            Some("smollm" | "starcoder" | "refact" | "codeshell")
        ) {
            let seq = Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ]);
            tokenizer.with_pre_tokenizer(Some(seq));
        }
        let token_at = |key: &str| -> Option<String> {
            let id = ct.metadata.get(key)?.to_u32().ok()?;
            tokenizer.id_to_token(id)
        };
        let arch = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok());
        let chat_template = ct
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned())
            .or_else(|| {
                (arch.map(String::as_str) == Some("gemma3")).then(|| GEMMA3_CHAT_TEMPLATE.into())
            });
        Ok(Self {
            chat_template,
            bos_token: token_at("tokenizer.ggml.bos_token_id"),
            eos_token: token_at("tokenizer.ggml.eos_token_id"),
            tokenizer,
        })
    }

    /// Reads `tokenizer.json`, and if present `tokenizer_config.json` and
    /// the chat template, in `dir`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
        let config = tokenizer_config(dir);
        let field = |k: &str| -> Option<String> {
            let v = config.as_ref()?.get(k)?;
            v.as_str()
                .map(String::from)
                .or_else(|| v.get("content")?.as_str().map(String::from))
        };
        Ok(Self {
            chat_template: hf_chat_template(dir, config.as_ref())?,
            bos_token: field("bos_token"),
            eos_token: field("eos_token"),
            tokenizer,
        })
    }

    /// The special token the tokenizer's post-processor puts before every
    /// text (a TemplateProcessing `<s> $A`, BERT's `[CLS]`), if any.
    pub fn prepended_special(&self) -> Option<u32> {
        let probe = "a";
        let plain = self.tokenizer.encode(probe, false).ok()?;
        let with = self.tokenizer.encode(probe, true).ok()?;
        let first_is_special = with.get_special_tokens_mask().first() == Some(&1);
        (with.len() > plain.len() && first_is_special).then(|| with.get_ids()[0])
    }

    /// Token ids of `text`, without special tokens (BOS is the caller's choice).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizer failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes text that may contain special tokens (chat-templated prompts).
    pub fn encode_with_specials(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow!("tokenizer failed to decode: {e}"))
    }

    /// Renders a one-turn chat prompt with the model's template.
    pub fn chat_prompt(&self, user: &str) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .context("this model has no chat template; drop --chat")?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .context("the model's chat template does not parse")?;
        let ctx = minijinja::context! {
            messages => vec![minijinja::context!{ role => "user", content => user }],
            add_generation_prompt => true,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        env.get_template("chat")?
            .render(ctx)
            .context("the model's chat template failed to render")
    }
}

/// Gemma 3's chat template (the instruction-tuned checkpoints' own, without
/// the system-prompt and image branches), for GGUF files that carry none.
pub const GEMMA3_CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}\
{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}\
<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}\
{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}";

/// llama.cpp's GGUF token types.
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

/// A SentencePiece-BPE tokenizer (`tokenizer.ggml.model = llama`: Gemma,
/// the original Llama) from GGUF tokens and scores, as transformers builds
/// it from a GGUF: BPE with byte fallback whose merges are every split of a
/// token into two tokens, ranked by the merged token's score (llama.cpp's
/// SentencePiece merge order), spaces written as `▁`, no pre-tokenizer.
/// Control tokens are special and
/// user-defined ones (Gemma's newline and tab runs) are matched whole
/// before the model, as llama.cpp does.
fn sentencepiece_from_gguf(ct: &gguf_file::Content) -> Result<Tokenizer> {
    use tokenizers::decoders::byte_fallback::ByteFallback;
    use tokenizers::decoders::fuse::Fuse;
    use tokenizers::decoders::sequence::Sequence as DecoderSequence;
    use tokenizers::models::bpe::BPE;
    use tokenizers::normalizers::replace::Replace;
    use tokenizers::AddedToken;

    let md = &ct.metadata;
    let list = |key: &str| -> Result<&Vec<gguf_file::Value>> {
        md.get(key)
            .and_then(|v| v.to_vec().ok())
            .with_context(|| format!("the GGUF SentencePiece tokenizer lacks `{key}`"))
    };
    let tokens = list("tokenizer.ggml.tokens")?;
    let scores = list("tokenizer.ggml.scores")?;
    if scores.len() != tokens.len() {
        anyhow::bail!(
            "the GGUF tokenizer has {} tokens but {} scores",
            tokens.len(),
            scores.len()
        );
    }
    let types: Vec<i32> = match md
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
    {
        Some(t) => t.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    let mut vocab = Vec::with_capacity(tokens.len());
    for (t, s) in tokens.iter().zip(scores) {
        let piece = t
            .to_string()
            .map_err(|e| anyhow!("a GGUF token is not a string: {e}"))?;
        let score = s
            .to_f32()
            .map_err(|e| anyhow!("a GGUF token score is not a number: {e}"))?;
        vocab.push((piece.clone(), f64::from(score)));
    }
    let unk = md
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(|v| v.to_u32().ok())
        .and_then(|u| vocab.get(u as usize))
        .map(|(piece, _)| piece.clone());
    let added: Vec<(String, bool)> = vocab
        .iter()
        .zip(&types)
        .filter(|(_, &ty)| ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED)
        .map(|((piece, _), &ty)| (piece.clone(), ty == TOKEN_CONTROL))
        .collect();
    let merges = sentencepiece_merges(&vocab);
    let ids: tokenizers::models::bpe::Vocab = vocab
        .iter()
        .enumerate()
        .map(|(i, (piece, _))| (piece.clone(), i as u32))
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(ids, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let model = builder
        .build()
        .map_err(|e| anyhow!("cannot build the SentencePiece tokenizer: {e}"))?;
    let mut tokenizer = Tokenizer::new(model);
    let space = Replace::new(" ", "▁")
        .map_err(|e| anyhow!("cannot build the SentencePiece normalizer: {e}"))?;
    let _ = tokenizer.with_normalizer(Some(space));
    let unspace = Replace::new("▁", " ")
        .map_err(|e| anyhow!("cannot build the SentencePiece decoder: {e}"))?;
    tokenizer.with_decoder(Some(DecoderSequence::new(vec![
        unspace.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ])));
    let (special, plain): (Vec<_>, Vec<_>) = added.into_iter().partition(|(_, sp)| *sp);
    let as_added = |list: Vec<(String, bool)>, special: bool| -> Vec<AddedToken> {
        list.into_iter()
            .map(|(p, _)| AddedToken::from(p, special).normalized(false))
            .collect()
    };
    tokenizer
        .add_special_tokens(as_added(special, true))
        .map_err(|e| anyhow!("cannot add the GGUF control tokens: {e}"))?;
    tokenizer
        .add_tokens(as_added(plain, false))
        .map_err(|e| anyhow!("cannot add the GGUF user-defined tokens: {e}"))?;
    Ok(tokenizer)
}

/// BPE merges for a SentencePiece vocabulary: every split of a token into
/// two tokens, the merged token's score first (higher wins), then longer
/// left and right parts, as transformers' `generate_merges` orders them.
fn sentencepiece_merges(vocab: &[(String, f64)]) -> Vec<(String, String)> {
    let index: std::collections::HashMap<&str, usize> = vocab
        .iter()
        .enumerate()
        .map(|(i, (p, _))| (p.as_str(), i))
        .collect();
    let mut merges: Vec<(f64, usize, usize, &str, &str)> = Vec::new();
    for (piece, score) in vocab {
        let mut local = Vec::new();
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                local.push((li, ri, l, r));
            }
        }
        local.sort_by_key(|&(li, ri, _, _)| (li, ri));
        merges.extend(
            local
                .into_iter()
                .map(|(_, _, l, r)| (*score, l.chars().count(), r.chars().count(), l, r)),
        );
    }
    // Stable, descending on (score, left length, right length).
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2)));
    merges
        .into_iter()
        .map(|(_, _, _, l, r)| (l.to_string(), r.to_string()))
        .collect()
}

/// BOS before text from a Hugging Face folder, decided as transformers
/// decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HfBos {
    pub add: bool,
    /// The token to put first, when the tokenizer names one.
    pub id: Option<u32>,
}

/// An explicit `add_bos_token` in `tokenizer_config.json` (scalpel's exports
/// write one) wins; else BOS is what the tokenizer's post-processor adds,
/// as `transformers` does (SmolLM2's adds none). None: the folder has
/// neither, so the config's default stands.
pub fn hf_dir_bos(dir: &Path, codec: Option<&TextCodec>) -> Option<HfBos> {
    let prepended = codec.and_then(TextCodec::prepended_special);
    let explicit = tokenizer_config(dir)
        .as_ref()
        .and_then(|c| c.get("add_bos_token")?.as_bool());
    match (explicit, codec) {
        (Some(add), _) => {
            let named = codec.and_then(|c| c.tokenizer.token_to_id(c.bos_token.as_deref()?));
            Some(HfBos {
                add,
                id: prepended.or(named),
            })
        }
        (None, Some(_)) => Some(HfBos {
            add: prepended.is_some(),
            id: prepended,
        }),
        (None, None) => None,
    }
}

fn tokenizer_config(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// The chat template where transformers looks for it: `chat_template.jinja`
/// (what current versions save), else `tokenizer_config.json`'s
/// `chat_template` (a string, or named templates of which `default` is
/// used), else a processor's `chat_template.json`.
fn hf_chat_template(dir: &Path, config: Option<&serde_json::Value>) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        let text = std::fs::read_to_string(&jinja)
            .with_context(|| format!("cannot read {}", jinja.display()))?;
        return Ok(Some(text));
    }
    if let Some(t) = config.and_then(|c| template_value(c.get("chat_template")?)) {
        return Ok(Some(t));
    }
    let json = dir.join("chat_template.json");
    if json.exists() {
        let text = std::fs::read_to_string(&json)
            .with_context(|| format!("cannot read {}", json.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", json.display()))?;
        return Ok(v.get("chat_template").and_then(template_value));
    }
    Ok(None)
}

/// A template given as a string or as `[{"name": .., "template": ..}]`.
fn template_value(v: &serde_json::Value) -> Option<String> {
    if let Some(s) = v.as_str() {
        return Some(s.to_string());
    }
    v.as_array()?
        .iter()
        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))?
        .get("template")?
        .as_str()
        .map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer.json whose post-processor puts `<s>` first, or
    /// has no post-processor.
    fn tokenizer_json(bos_template: bool) -> String {
        let post = if bos_template {
            r#"{"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}"#
        } else {
            "null"
        };
        format!(
            r#"{{"version": "1.0", "truncation": null, "padding": null,
                "added_tokens": [{{"id": 1, "content": "<s>", "single_word": false, "lstrip": false,
                  "rstrip": false, "normalized": false, "special": true}}],
                "normalizer": null, "pre_tokenizer": {{"type": "Whitespace"}},
                "post_processor": {post}, "decoder": null,
                "model": {{"type": "WordLevel", "vocab": {{"<unk>": 0, "<s>": 1, "a": 2}}, "unk_token": "<unk>"}}}}"#
        )
    }

    fn folder(bos_template: bool, tokenizer_config: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokenizer.json"),
            tokenizer_json(bos_template),
        )
        .unwrap();
        if let Some(c) = tokenizer_config {
            std::fs::write(dir.path().join("tokenizer_config.json"), c).unwrap();
        }
        dir
    }

    fn bos_of(dir: &tempfile::TempDir) -> Option<HfBos> {
        let codec = TextCodec::from_hf_dir(dir.path()).unwrap();
        hf_dir_bos(dir.path(), Some(&codec))
    }

    #[test]
    fn bos_follows_the_post_processor_unless_the_config_says_otherwise() {
        let with = Some(HfBos {
            add: true,
            id: Some(1),
        });
        assert_eq!(bos_of(&folder(true, None)), with);
        assert_eq!(
            bos_of(&folder(false, None)),
            Some(HfBos {
                add: false,
                id: None
            })
        );
        // A config without the flag leaves it to the post-processor.
        assert!(
            !bos_of(&folder(false, Some(r#"{"bos_token": "<s>"}"#)))
                .unwrap()
                .add
        );
        // An explicit flag wins either way; the id comes from the tokenizer.
        let off = bos_of(&folder(true, Some(r#"{"add_bos_token": false}"#))).unwrap();
        assert!(!off.add);
        let on = r#"{"add_bos_token": true, "bos_token": {"content": "<s>"}}"#;
        assert_eq!(bos_of(&folder(false, Some(on))), with);
        // No tokenizer and no flag: nothing to say.
        let bare = tempfile::tempdir().unwrap();
        assert_eq!(hf_dir_bos(bare.path(), None), None);
    }

    #[test]
    fn chat_template_is_found_where_transformers_looks() {
        let template =
            |dir: &tempfile::TempDir| TextCodec::from_hf_dir(dir.path()).unwrap().chat_template;
        let dir = folder(false, Some(r#"{"chat_template": "from config"}"#));
        assert_eq!(template(&dir).as_deref(), Some("from config"));
        std::fs::write(
            dir.path().join("chat_template.json"),
            r#"{"chat_template": "json"}"#,
        )
        .unwrap();
        assert_eq!(template(&dir).as_deref(), Some("from config"));
        std::fs::write(dir.path().join("chat_template.jinja"), "jinja").unwrap();
        assert_eq!(template(&dir).as_deref(), Some("jinja"));

        let dir = folder(false, None);
        assert_eq!(template(&dir), None);
        std::fs::write(
            dir.path().join("chat_template.json"),
            r#"{"chat_template": "json"}"#,
        )
        .unwrap();
        assert_eq!(template(&dir).as_deref(), Some("json"));

        let named = r#"{"chat_template": [{"name": "tool_use", "template": "t"},
                                          {"name": "default", "template": "d"}]}"#;
        assert_eq!(template(&folder(false, Some(named))).as_deref(), Some("d"));
    }

    #[test]
    fn a_broken_chat_template_json_is_named() {
        let dir = folder(false, None);
        std::fs::write(dir.path().join("chat_template.json"), "{not json").unwrap();
        let err = TextCodec::from_hf_dir(dir.path()).err().unwrap();
        assert!(
            format!("{err:#}").contains("chat_template.json is not valid JSON"),
            "{err:#}"
        );
    }
}
