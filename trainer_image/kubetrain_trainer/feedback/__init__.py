"""The feedback loop: turning the router's log into labelling work, labels and drift signals."""
