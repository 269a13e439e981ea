//! Text conditioning: CogVideoX's T5 encoder and its tokenizer.
//!
//! - [`t5`]: the T5 v1.1 encoder stack (transformers' `T5EncoderModel`), run without an attention
//!   mask as `CogVideoXPipeline` runs it.
//! - [`tokenizer`]: [`tokenizer::TextTokenizer`], from a `tokenizer.json` (any `tokenizers` model)
//!   or from a SentencePiece `spiece.model` (what CogVideoX's `tokenizer/` folders ship), padding
//!   every prompt to a fixed length as the pipeline does.
//! - [`spiece`]: a reader for SentencePiece's `ModelProto` file format.

pub mod spiece;
pub mod t5;
pub mod tokenizer;
