"""seqio task and mixture registrations; importing this package registers them.

Tasks read data through `t5gemma_jax.data`; none are registered yet (the objectives issue adds
span corruption, UL2, PrefixLM, translation and summarisation tasks here).
"""
