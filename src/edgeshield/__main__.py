from edgeshield.cli import main

main()
