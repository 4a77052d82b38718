"""GPU memory planner ("know before you queue"), login-node side: stdlib only, no torch.

* :mod:`.params`   exact parameter counts from a model's ``config.json`` / Meta ``params.json``;
* :mod:`.estimate` the per-rank memory breakdown of a training setup (weights, grads, optimizer
  states, activations, logits, DeepSpeed buffers, framework overhead) and host memory per node.
"""
