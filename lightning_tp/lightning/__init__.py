"""The Lightning integration: the strategy (glue), TP-aware precision plugins, sharded
checkpoints, fault handling and the spawn launcher."""
