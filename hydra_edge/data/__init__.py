"""Training data: reading files, row formats, chat templates, and rendering rows into token ids."""
