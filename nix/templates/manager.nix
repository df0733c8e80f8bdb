# The base of the manager's container (`hm1nd`): the harness as hive-m1nd, with the manager's
# tools. Its extra bind mounts (/agents, /applied, /meta) come from hive-c0re.
{
  imports = [ ./harness-base.nix ];
  hyperhive.role = "manager";
}
