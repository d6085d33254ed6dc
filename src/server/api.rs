//! OpenAI-shaped request bodies and errors.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

/// An error as OpenAI's API writes it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// 400 invalid_request_error about `param`.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> ApiError {
        ApiError {
            param: param.map(str::to_string),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", message).code("not_found")
    }

    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            e.to_string(),
        )
    }

    /// Engine errors: bad input is the client's (400), the rest the server's (500).
    pub fn from_engine(e: crate::Error) -> ApiError {
        match e {
            crate::Error::Input(m) => {
                let code = m.contains("context").then_some("context_length_exceeded");
                ApiError {
                    code,
                    ..ApiError::invalid(m, None)
                }
            }
            e => ApiError::internal(e),
        }
    }

    pub fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.json())).into_response()
    }
}

/// Parse a request body as JSON (400 if it is not).
pub fn parse_json(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}"), None))?;
    if !v.is_object() {
        return Err(ApiError::invalid("the body must be a JSON object", None));
    }
    Ok(v)
}

/// Read `T` from a parsed body; the error names the offending field (`param`).
pub fn from_value<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let param = (path != ".").then_some(path);
        let msg = match &param {
            Some(p) => format!("{p}: {}", e.inner()),
            None => e.inner().to_string(),
        };
        ApiError {
            param,
            ..ApiError::invalid(msg, None)
        }
    })
}

/// Parse a JSON body into `T` (see [`parse_json`], [`from_value`]).
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    from_value(&parse_json(body)?)
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Fields shared by both completion endpoints (OpenAI's, then kvlink's extensions), read
/// from the same body as [`ChatBody`] / [`CompletionBody`] (not `flatten`ed into them:
/// that would lose the field names in errors).
#[derive(Deserialize)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<usize>,
    /// Chat's newer name for max_tokens.
    pub max_completion_tokens: Option<usize>,
    /// Default 0 (greedy, like `kvlink ask`), not OpenAI's 1.
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub stream: bool,
    pub n: Option<u32>,
    /// Extension: registered document ids, placed before the question.
    #[serde(default)]
    pub documents: Vec<String>,
    /// Extension: kvlink (default) | full | naive.
    pub kvlink_mode: Option<String>,
    /// Extension (llama.cpp's): keep the most likely K tokens.
    pub top_k: Option<usize>,
    /// Extension (llama.cpp's): do not stop at end-of-turn tokens.
    #[serde(default)]
    pub ignore_eos: bool,
}

#[derive(Deserialize)]
pub struct ChatBody {
    pub messages: Vec<Message>,
}

#[derive(Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Content,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: String,
}

impl Content {
    /// The text of a message (text parts joined); None if it has other kinds of parts.
    pub fn text(&self) -> Option<String> {
        match self {
            Content::Text(s) => Some(s.clone()),
            Content::Parts(p) => p
                .iter()
                .map(|p| (p.kind == "text").then_some(p.text.as_str()))
                .collect::<Option<Vec<_>>>()
                .map(|v| v.concat()),
        }
    }
}

#[derive(Deserialize)]
pub struct CompletionBody {
    pub prompt: OneOrMany,
}

#[derive(Deserialize)]
pub struct DocumentBody {
    pub text: String,
    pub title: Option<String>,
}
