//! Offline only: everything that makes and judges a model, linked by `cargo xtask` and never by
//! the plugin. Chord models' training (`chords`), training windows and data sets (`data`), the
//! training loop (`trainer`) with its fused ops (`fused`, `forward`, `loss`; `gpu_recurrence`
//! on a CUDA GPU), the optimiser (`optim`), distillation (`distill`), and evaluation against
//! held-out songs (`eval`).
//! Runs on: offline threads (xtask, tests).

pub mod chords;
pub mod data;
pub mod distill;
pub mod eval;
pub mod forward;
pub mod fused;
#[cfg(any(feature = "cuda", test))]
mod gpu_recurrence;
pub mod loss;
pub mod optim;
pub mod trainer;

pub use forward::SequenceForward;
