"""The backfill engine: plan -> run -> commit.

``plan`` splits fragments into work units, ``run`` streams them through the UDF
stages on Ray Data and checkpoints each finished unit, ``commit`` writes the
new column files back fragment by fragment through the one commit path.
"""
