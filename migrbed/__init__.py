"""The embedded test bed (namespace hosts, private sshds, etcd members) and the programs the demo,
tests and benchmarks run. Apart from the product: the engine, agent and adapters never import it;
only the `migrctl bed` and `migrctl demo` commands do."""
