//! The tokenizer metadata of a GGUF file.

#[allow(unused_imports)]
use super::*;
// ---------------------------------------------------------------------------------------
// tokenizer metadata
// ---------------------------------------------------------------------------------------

impl GgufTokenizerMeta {
    /// Collect the `tokenizer.ggml.*` / `tokenizer.chat_template` metadata of a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<GgufTokenizerMeta> {
        let path = file.path();
        let bad = |msg: String| Error::bad_model(path, msg);
        let model = file
            .get_str("tokenizer.ggml.model")
            .ok_or_else(|| {
                bad("missing metadata tokenizer.ggml.model (no tokenizer in this GGUF)".into())
            })?
            .to_string();
        let str_array = |key: &str| -> Result<Option<Vec<String>>> {
            match file.get(key) {
                None => Ok(None),
                Some(v) => {
                    let a = v
                        .as_array()
                        .ok_or_else(|| bad(format!("metadata {key} is not an array")))?;
                    a.iter()
                        .map(|x| {
                            x.as_str().map(str::to_owned).ok_or_else(|| {
                                bad(format!("metadata {key} is not an array of strings"))
                            })
                        })
                        .collect::<Result<Vec<_>>>()
                        .map(Some)
                }
            }
        };
        let tokens = str_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| bad("missing metadata tokenizer.ggml.tokens".into()))?;
        let merges = str_array("tokenizer.ggml.merges")?.unwrap_or_default();
        let token_types = match file.get("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .ok_or_else(|| bad("metadata tokenizer.ggml.token_type is not an array".into()))?
                .iter()
                .map(|x| x.as_i64().map(|t| t as i32).unwrap_or(1))
                .collect(),
        };
        let scores = match file.get("tokenizer.ggml.scores") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .ok_or_else(|| bad("metadata tokenizer.ggml.scores is not an array".into()))?
                .iter()
                .map(|x| x.as_f64().unwrap_or(0.0) as f32)
                .collect(),
        };
        let id = |key: &str| -> Option<u32> {
            file.get_u64(key)
                .filter(|&v| (v as usize) < tokens.len())
                .map(|v| v as u32)
        };
        Ok(GgufTokenizerMeta {
            source: path.to_path_buf(),
            model,
            pre: file.get_str("tokenizer.ggml.pre").map(str::to_owned),
            bos_id: id("tokenizer.ggml.bos_token_id"),
            eos_id: id("tokenizer.ggml.eos_token_id"),
            eot_id: id("tokenizer.ggml.eot_token_id"),
            pad_id: id("tokenizer.ggml.padding_token_id"),
            unk_id: id("tokenizer.ggml.unknown_token_id"),
            add_bos: file.get_bool("tokenizer.ggml.add_bos_token"),
            add_space_prefix: file.get_bool("tokenizer.ggml.add_space_prefix"),
            chat_template: file.get_str("tokenizer.chat_template").map(str::to_owned),
            tokens,
            merges,
            token_types,
            scores,
        })
    }
}
