"""Resolution of user inputs: model aliases, chunked packages, GGUF conversion, datasets, chat templates and
prompt sets, turned into local paths and loaded objects that the Ray jobs hand down to trainer and eval."""
