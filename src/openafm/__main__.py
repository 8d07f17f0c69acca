from openafm.cli.main import main

main()
