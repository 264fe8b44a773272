"""`python -m debias ...`: the `debias` command."""

from debias.commands import main

main()
