"""Named, built-in model presets (the offline ``smolvlm-tiny``)."""
