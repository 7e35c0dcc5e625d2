//! Quality measures of generated images: the task score of a toy model (`task.json`) and
//! the deviation of a pruned model from the dense one. Used by `sdsparse sweep` and the demo.

pub mod deviation;
pub mod task;
