# report rules: filled in by the report stage.
