# data rules: filled in by the data stage.
