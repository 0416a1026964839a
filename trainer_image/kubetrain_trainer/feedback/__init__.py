"""The router's feedback as training data (`kubetrain feedback export`, docs/router.md).

`export` turns the store's `export_feedback` rows into immutable, versioned data set
snapshots (SFT examples, preference pairs, binary-labelled answers); `pii` scrubs personal
data and secrets from every text first.
"""
