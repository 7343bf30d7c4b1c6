"""LLaVA datasets: conversation JSON/JSONL readers and validation, the synthetic world, collators.

Main entry points (the CLI's ``data`` commands delegate to these):

- :func:`llava_edge.data.dataset.validate` and :class:`llava_edge.data.dataset.LlavaDataset`
- :func:`llava_edge.data.synth.synth` and :func:`llava_edge.data.synth.corpus_texts`
- :func:`llava_edge.data.stage1.write_stage1` (caption pairs -> stage-1 records)
"""
