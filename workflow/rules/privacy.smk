# privacy rules: filled in by the privacy stage.
