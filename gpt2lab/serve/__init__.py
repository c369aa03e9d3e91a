"""``gpt2lab serve``: a trained model behind OpenAI's HTTP API, on LitServe. ``spec.py`` is the API (the
endpoints, the requests checked, the answers and streams), ``api.py`` the LitServe worker that holds the model,
``batching.py`` the continuous batching of every request being decoded, ``server.py`` the command as a function.
See docs/serving.md."""
