"""The benchmark harness: sweeps, measurement, records, aggregation, reports, figures and the `lemo` CLI.

The method library (`lemo`) never imports this package; it needs the `bench` extra (pandas, matplotlib,
pyyaml, snakemake, nvidia-ml-py): `pip install -e '.[bench]'`.
"""
