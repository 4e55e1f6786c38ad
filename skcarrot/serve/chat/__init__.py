"""The chat model ``skcarrot serve`` answers with at ``/v1/chat/completions``: a micro generative VLM.

- :mod:`.model`: the network (the embedded CLIP's image tower, visual prefix tokens, a causal decoder
  over open_clip's BPE vocabulary) and the chat text format;
- :mod:`.engine`: loading the shipped weights and answering parsed requests (greedy tokens, their
  log-probabilities and alternatives, billed tokens);
- :mod:`.recipe`: how the shipped weights were trained (``python -m skcarrot.serve.chat.recipe``).
"""
