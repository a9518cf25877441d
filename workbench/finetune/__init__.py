"""Fine-tuning, behind `workbench.finetune` and `%finetune`: data, the training process,
checkpoints, export.

The package shares its name with the public function. `workbench/__init__.py` imports
this package before it binds the function, so that importing a submodule later (which
binds a new submodule's name on its parent) never replaces the function."""
