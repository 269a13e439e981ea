//! Helpers shared by the pipeline's integration tests.

use candle_core::Tensor;
use std::collections::HashMap;
use std::ops::ControlFlow;
use vdit_pipeline::{Event, GenerateRequest, PromptInput};

/// Each step of a run: (timestep, guidance scale, batch of the transformer's output, latents).
pub type Steps = Vec<(usize, f64, usize, Tensor)>;

/// An observer that records every step into `steps`.
pub fn record(steps: &mut Steps) -> impl FnMut(Event<'_>) -> ControlFlow<()> + '_ {
    |e| {
        if let Event::Step {
            timestep,
            guidance_scale,
            model_output,
            latents,
            ..
        } = e
        {
            let b = model_output.dim(0).unwrap();
            steps.push((timestep, guidance_scale, b, latents.clone()));
        }
        ControlFlow::Continue(())
    }
}

/// A 9x32x48 request from a fixture's prompt and negative-prompt embeddings.
#[allow(dead_code)] // not every test crate that includes this module builds requests
pub fn embeds_request(inputs: &HashMap<String, Tensor>) -> GenerateRequest {
    GenerateRequest {
        prompt: PromptInput::Embeds(inputs["prompt_embeds"].clone()),
        negative_prompt: Some(PromptInput::Embeds(
            inputs["negative_prompt_embeds"].clone(),
        )),
        num_frames: Some(9),
        height: Some(32),
        width: Some(48),
        ..Default::default()
    }
}
