"""The router's feedback as training data (docs/router.md, docs/feedback-active.md).

`export` turns the store's `export_feedback` rows into immutable, versioned data set
snapshots (SFT examples, preference pairs, binary-labelled answers); `pii` scrubs personal
data and secrets from every text first. `select` picks the prompts most worth labelling,
`labels` imports the labels, and `drift` compares live prompts with the training data.
"""
