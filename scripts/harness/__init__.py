"""What the fault runner (scripts/faults.py), `make up` (scripts/run_system.py) and the benchmark
(benchmarks/pipeline.py) share, one concern a module:

- `processes`: start, kill, stop and restart a service's process (or its replicas) with a log
  file each; wait until they answer ready, failing with the log's tail and the exit status;
- `balancer`: one address in front of a service's replicas, as a Kubernetes Service is;
- `cluster`: a local multi-broker KRaft Kafka cluster;
- `deployment`: the fault run's deployment (replicas of every service, the cluster, PostgreSQL,
  the provider simulator and the sinks), configured and ready to start;
- `sinks`: the mail sink and the webhook receiver, each journaling what it receives to a file;
- `workload`: staff, learners and the partner institution (catalog, enrollments, payments,
  signed completion reports);
- `monitor`: the pipeline's counters, sampled from the services' databases and the journals;
- `outages`: the faults (SIGKILL of a replica, the sink, a broker, PostgreSQL), what each was
  seen to do and how the pipeline came through;
- `accounting`: the final accounting from the records (topics, databases, journals, dead
  letters), and the result it renders.

The package sits in `scripts/`; the tools put that folder on `sys.path` and import `harness.<module>`.
"""
