"""Code that runs inside Slurm jobs. Needs the ``train`` extra (torch, deepspeed, ...).

Nothing on the login-node path (``hpcjobs --help``, render, submit, status)
may import from this package.
"""
