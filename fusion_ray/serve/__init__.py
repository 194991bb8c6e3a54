"""Serving: a chat model on Ray Serve behind an OpenAI-compatible endpoint.

`protocol` (request validation, response shapes, errors) and `text` (streamed text and
stop sequences) are pure; `engines` holds the vLLM and transformers engines; `app` is the
Ray Serve application (`build_app` for Serve configs, `deploy` for the CLI); `stage` is the
pipeline's serve stage. Importing this package loads none of them.
"""
