"""Fine-tuning (`workbench.finetune`): data, the training process, checkpoints, export.

Named `training`, not `finetune`: importing a subpackage binds its name on the parent
package, which would hide the `workbench.finetune` function."""
