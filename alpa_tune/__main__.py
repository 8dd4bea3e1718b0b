from alpa_tune.cli import main

main()
