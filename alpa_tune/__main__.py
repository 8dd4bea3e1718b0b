from alpa_tune.entry import main

main()
