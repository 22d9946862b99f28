//! A closure's gradient ops recorded from the stream as a CUDA graph and
//! replayed with one launch: a fine-tuning step is some 130 small ops a
//! block, and queued one by one the host's launch time, not the GPU, sets
//! its pace.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use dpllm_engine::backend::cuda::cudarc;

use cudarc::driver::{sys, CudaGraph, CudaStream};

use crate::step::{Recorder, Replay};

/// Records what is queued on one stream (capture mode relaxed, as the
/// engine's decode graphs: allocations and frees inside the recording
/// become the graph's own).
pub(crate) struct StreamRecorder {
    stream: Arc<CudaStream>,
}

impl StreamRecorder {
    pub(crate) fn new(stream: Arc<CudaStream>) -> StreamRecorder {
        StreamRecorder { stream }
    }
}

impl Recorder for StreamRecorder {
    fn record(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Box<dyn Replay>> {
        use sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
        (self.stream.begin_capture(CU_STREAM_CAPTURE_MODE_RELAXED))
            .map_err(|e| anyhow!("CUDA graph: cannot start recording: {e}"))?;
        let ran = f();
        // Always end the capture, so the stream works as before whatever happened.
        let ended = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
        // Errors cudarc keeps aside (from frees while recording) would come
        // back from a later, unrelated call: take them now.
        let kept = self.stream.context().check_err();
        match (ran, ended, kept) {
            (Ok(()), Ok(Some(graph)), Ok(())) => Ok(Box::new(StreamReplay { graph })),
            (Err(e), ..) => Err(e.context("CUDA graph: recording the ops")),
            (_, Err(e), _) => bail!("CUDA graph: ending the recording: {e}"),
            (_, Ok(None), _) => bail!("CUDA graph: the recording holds no ops"),
            (.., Err(e)) => bail!("CUDA graph: an op failed while recording: {e}"),
        }
    }
}

/// A recorded graph, launched on the stream it was recorded from.
struct StreamReplay {
    graph: CudaGraph,
}

impl Replay for StreamReplay {
    fn replay(&self) -> Result<()> {
        (self.graph.launch()).map_err(|e| anyhow!("CUDA graph: launching: {e}"))
    }
}
