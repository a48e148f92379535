from sorakit.cli import main

main()
