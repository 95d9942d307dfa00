"""What differs between the families around the shared model, loop and run directory: how data
becomes batches, what validation and evaluation report, and what `generate` prints. Each family
(tfx/families/) names its task class; `tfx.families.get_task(recipe, run_dir)` makes one."""
