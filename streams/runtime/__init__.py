"""The worker: a batch loop that delegates to a processor, a checkpoint and a sink, hosted by Faust."""
