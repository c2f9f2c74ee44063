"""Collecting teacher answers from an OpenAI-compatible chat endpoint, one job per module.

- :mod:`gadchat.teacher.client`: the chat client (``ChatEndpoint``, its errors, API key, redaction,
  completion parsing);
- :mod:`gadchat.teacher.prompts`: prompt rows (``PromptRow``, ``load_prompt_rows``, ``collection_key``);
- :mod:`gadchat.teacher.jsonl`: durable JSON-lines files (``JsonlAppender``, ``recover_jsonl``);
- :mod:`gadchat.teacher.collect`: the resumable collection loop (``collect_teacher_data``,
  ``CollectionReport``, ``teacher_row``, ``prompt_token_counter``, ``sidecar_paths``).
"""
