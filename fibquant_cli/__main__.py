from fibquant_cli.cli import main

main()
