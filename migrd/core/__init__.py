"""The pure core: policy, cost model, precheck and the agent's round. No I/O."""
